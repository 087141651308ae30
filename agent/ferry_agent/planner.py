"""Transfer planning: pure functions from layouts to descriptor segments.

pair      tensors by name, checking dtype, shape and byte size of every pair;
coalesce  runs adjacent on both sides into one segment;
chunk     segments into pieces of at most `chunk_bytes` (several in flight);
stripe    chunks across sources, least-loaded first.

No NIXL, no I/O: everything here is unit-tested on plain data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import LayoutMismatch
from .layout import ALIGNMENT, Placement

# Pieces are cut at 4 KiB (page) boundaries, except a segment's end.
CHUNK_ALIGN = 4096
# How many differences a LayoutMismatch message names.
MAX_REPORTED = 5


@dataclass(frozen=True)
class Segment:
    """One descriptor pair: `nbytes` from source `source` into the target."""

    source: int
    src_slab: int
    src_offset: int
    dst_slab: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    bytes: int  # tensor bytes (padding moved inside coalesced runs not counted)
    tensors: int
    sources: int

    @property
    def descriptors(self) -> int:
        return len(self.segments)

    @property
    def moved_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def for_source(self, k: int) -> list[Segment]:
        return [s for s in self.segments if s.source == k]


def pair(
    source: Sequence[Placement],
    target: Sequence[Placement],
    *,
    source_name: str = "source",
    target_name: str = "target",
) -> list[tuple[Placement, Placement]]:
    """Pair by name; raise LayoutMismatch naming the first differences."""
    src = {p.name: p for p in source}
    diffs: list[str] = []
    pairs: list[tuple[Placement, Placement]] = []
    for t in target:
        s = src.get(t.name)
        if s is None:
            diffs.append(f"{t.name}: missing on {source_name}")
            continue
        if s.dtype != t.dtype:
            diffs.append(
                f"{t.name}: dtype {s.dtype} on {source_name} != {t.dtype} on {target_name}"
            )
        elif s.shape != t.shape:
            diffs.append(
                f"{t.name}: shape {list(s.shape)} on {source_name} != {list(t.shape)} on {target_name}"
            )
        elif s.nbytes != t.nbytes:
            diffs.append(
                f"{t.name}: {s.nbytes} bytes on {source_name} != {t.nbytes} on {target_name}"
            )
        else:
            pairs.append((s, t))
    tgt_names = {t.name for t in target}
    diffs.extend(f"{p.name}: missing on {target_name}" for p in source if p.name not in tgt_names)
    if diffs:
        shown = "; ".join(diffs[:MAX_REPORTED])
        more = f" (and {len(diffs) - MAX_REPORTED} more)" if len(diffs) > MAX_REPORTED else ""
        raise LayoutMismatch(
            f"layout of {source_name} does not match {target_name}: {len(diffs)} differences: "
            f"{shown}{more}",
            differences=diffs[:MAX_REPORTED],
            count=len(diffs),
            source=source_name,
        )
    return pairs


def _successors(placements: Sequence[Placement]) -> dict[str, str]:
    """name -> name of the next tensor in the same slab by offset."""
    order = sorted(placements, key=lambda p: (p.slab, p.offset))
    nxt: dict[str, str] = {}
    for a, b in zip(order, order[1:], strict=False):
        if a.slab == b.slab:
            nxt[a.name] = b.name
    return nxt


def coalesce(
    pairs: Sequence[tuple[Placement, Placement]],
    source: int = 0,
    *,
    max_gap: int = ALIGNMENT,
    target: Sequence[Placement] | None = None,
) -> list[Segment]:
    """Merge pairs that are adjacent on both sides into single segments.

    Adjacent: same slabs, the next tensor follows on both sides after the same
    gap (alignment padding, < `max_gap`), and no target tensor lies in that gap
    (the next target tensor is the immediate successor). Padding is copied
    along: it belongs to no tensor on the target.
    """
    live = [(s, t) for s, t in pairs if t.nbytes > 0]
    live.sort(key=lambda st: (st[0].slab, st[0].offset))
    succ = _successors(target if target is not None else [t for _, t in pairs])
    out: list[Segment] = []
    cur: Segment | None = None
    last_t: Placement | None = None
    for s, t in live:
        if cur is not None and last_t is not None:
            src_gap = s.offset - (cur.src_offset + cur.nbytes)
            dst_gap = t.offset - (cur.dst_offset + cur.nbytes)
            if (
                s.slab == cur.src_slab
                and t.slab == cur.dst_slab
                and src_gap == dst_gap
                and 0 <= src_gap < max_gap
                and succ.get(last_t.name) == t.name
            ):
                cur = Segment(
                    source,
                    cur.src_slab,
                    cur.src_offset,
                    cur.dst_slab,
                    cur.dst_offset,
                    cur.nbytes + src_gap + t.nbytes,
                )
                last_t = t
                continue
            out.append(cur)
        cur = Segment(source, s.slab, s.offset, t.slab, t.offset, t.nbytes)
        last_t = t
    if cur is not None:
        out.append(cur)
    return out


def joined(segs: Sequence[Segment]) -> list[Segment]:
    """Segments of one source that continue each other on both sides (same slabs) as one.

    Sorted by source and source offset; no gap is bridged (unlike `coalesce`, whose
    pairs know which target tensor comes next).
    """
    out: list[Segment] = []
    for g in sorted(segs, key=lambda g: (g.source, g.src_slab, g.src_offset)):
        last = out[-1] if out else None
        if (
            last is not None
            and (last.source, last.src_slab, last.dst_slab) == (g.source, g.src_slab, g.dst_slab)
            and last.src_offset + last.nbytes == g.src_offset
            and last.dst_offset + last.nbytes == g.dst_offset
        ):
            out[-1] = replace(last, nbytes=last.nbytes + g.nbytes)
        else:
            out.append(g)
    return out


def chunk(segments: Sequence[Segment], chunk_bytes: int) -> list[Segment]:
    """Cut each segment into near-equal pieces of at most `chunk_bytes` (page-aligned cuts)."""
    if chunk_bytes < CHUNK_ALIGN:
        raise ValueError(f"chunk_bytes must be at least {CHUNK_ALIGN}")
    out: list[Segment] = []
    for seg in segments:
        n = math.ceil(seg.nbytes / chunk_bytes)
        if n <= 1:
            out.append(seg)
            continue
        piece = -(-seg.nbytes // n)
        piece = -(-piece // CHUNK_ALIGN) * CHUNK_ALIGN
        piece = min(piece, chunk_bytes // CHUNK_ALIGN * CHUNK_ALIGN) or CHUNK_ALIGN
        off = 0
        while off < seg.nbytes:
            size = min(piece, seg.nbytes - off)
            out.append(
                Segment(
                    seg.source,
                    seg.src_slab,
                    seg.src_offset + off,
                    seg.dst_slab,
                    seg.dst_offset + off,
                    size,
                )
            )
            off += size
    return out


def stripe(chunks: Sequence[Segment], sources: int) -> list[Segment]:
    """Give each chunk, in order, to the source with the fewest bytes so far."""
    if sources <= 1:
        return [
            Segment(0, c.src_slab, c.src_offset, c.dst_slab, c.dst_offset, c.nbytes) for c in chunks
        ]
    load = [0] * sources
    out = []
    for c in chunks:
        k = min(range(sources), key=lambda i: (load[i], i))
        load[k] += c.nbytes
        out.append(Segment(k, c.src_slab, c.src_offset, c.dst_slab, c.dst_offset, c.nbytes))
    return out


def _same_placement(a: Sequence[Placement], b: Sequence[Placement]) -> bool:
    bb = {p.name: (p.slab, p.offset) for p in b}
    return all(bb.get(p.name) == (p.slab, p.offset) for p in a) and len(a) == len(b)


def _partition(target: Sequence[Placement], parts: int) -> list[list[Placement]]:
    """Split target tensors (slab/offset order) into `parts` contiguous groups of similar bytes."""
    order = sorted(target, key=lambda p: (p.slab, p.offset))
    total = sum(p.nbytes for p in order) or 1
    groups: list[list[Placement]] = [[] for _ in range(parts)]
    acc = 0
    for p in order:
        k = min(parts - 1, acc * parts // total)
        groups[k].append(p)
        acc += p.nbytes
    return groups


def build_plan(
    sources: Sequence[Sequence[Placement]],
    target: Sequence[Placement],
    *,
    chunk_bytes: int,
    source_names: Sequence[str] | None = None,
    max_gap: int = ALIGNMENT,
) -> Plan:
    """Full plan: pair against every source first (no byte moves on mismatch), then
    coalesce, chunk and stripe. Sources with identical placements share chunks
    round-robin; otherwise each source serves a contiguous share of the tensors."""
    if not sources:
        raise ValueError("at least one source is needed")
    names = list(source_names or [f"source[{k}]" for k in range(len(sources))])
    pairs = [pair(src, target, source_name=names[k]) for k, src in enumerate(sources)]
    total = sum(t.nbytes for t in target)
    if all(_same_placement(sources[0], s) for s in sources[1:]):
        segs = chunk(coalesce(pairs[0], 0, max_gap=max_gap, target=target), chunk_bytes)
        segs = stripe(segs, len(sources))
    else:
        segs = []
        groups = _partition(target, len(sources))
        for k, group in enumerate(groups):
            members = {p.name for p in group}
            mine = [(s, t) for s, t in pairs[k] if t.name in members]
            segs.extend(chunk(coalesce(mine, k, max_gap=max_gap, target=target), chunk_bytes))
    return Plan(tuple(segs), total, len(target), len(sources))

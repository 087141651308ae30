"""Tensor-parallel reshard planning: pure functions, no NIXL, no I/O.

Sources hold a weight set sharded over `S` TP ranks; a target is rank `r` of a
TP group of size `T` (S != T allowed). A rule table, by name pattern, says how
each tensor is split:
  column  split on dim 0 (q/k/v, gate/up, vocab-parallel embeddings): every
          overlap between a source shard and the target shard is one contiguous
          byte range on both sides -> a *direct* piece, READ straight into place;
  row     split on dim 1 (o_proj, down_proj): an overlap is a strided column
          block -> a *scratch* piece: the covering contiguous range of the source
          shard is READ into registered scratch, then copied into place on the
          target's device. (When the widths match, as with S == T, it is direct.)
  replicated  every rank holds the whole tensor: READ from source rank 0.
The result is exactly the tensor a direct load of the target's shard would give.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import LayoutMismatch
from ..layout import ALIGNMENT, DTYPE_SIZES, Placement, TensorSpec, align_up
from ..planner import MAX_REPORTED, Segment, joined

COLUMN, ROW, REPLICATED = "column", "row", "replicated"

# First match wins. Names follow Hugging Face Llama/Qwen/Mistral checkpoints plus
# the short Meta names (wq, w1, ...).
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)\.(weight|bias)$", COLUMN),
    (r"\.(wq|wk|wv|w1|w3)(\.weight)?$", COLUMN),
    (r"(embed_tokens|lm_head)\.weight$", COLUMN),
    (r"(o_proj|down_proj)\.weight$", ROW),
    (r"\.(wo|w2)(\.weight)?$", ROW),
    (r".", REPLICATED),
)


def rule_for(name: str, rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> str:
    for pattern, kind in rules:
        if re.search(pattern, name):
            return kind
    return REPLICATED


@dataclass(frozen=True)
class Piece:
    """Bytes of one source shard for one target tensor.

    direct: src bytes [src_offset, +nbytes) of the source tensor land at
            [dst_offset, +nbytes) of the target tensor.
    scratch: src bytes [src_offset, +nbytes) go to scratch at `scratch_offset`;
            there they are a [rows, src_width] row-major block (element units) of
            which columns [col, col + width) are copied to target columns
            [dst_col, dst_col + width)."""

    name: str
    source: int
    src_offset: int
    nbytes: int
    direct: bool
    dst_offset: int = 0
    scratch_offset: int = 0
    rows: int = 0
    src_width: int = 0
    col: int = 0
    width: int = 0
    dst_col: int = 0


@dataclass(frozen=True)
class ReshardPlan:
    pieces: tuple[Piece, ...]
    scratch_bytes: int
    target_rank: int
    target_tp: int
    source_tp: int

    @property
    def direct(self) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.direct)

    @property
    def scratch(self) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if not p.direct)

    @property
    def read_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def _split_dim(kind: str, ndim: int) -> int | None:
    if kind == COLUMN:
        return 0
    if kind == ROW:
        return 1 if ndim >= 2 else None
    return None


def plan_reshard(
    sources: Sequence[Sequence[Placement]],
    target: Sequence[Placement],
    *,
    target_rank: int,
    target_tp: int,
    rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
) -> ReshardPlan:
    """Pieces that build every target tensor from source shards (rank order).

    Raises LayoutMismatch (naming the first differences) when a tensor is missing
    on a source rank, dtypes differ, shards disagree, or a split does not divide."""
    if not 0 <= target_rank < target_tp:
        raise ValueError(f"target rank {target_rank} outside TP size {target_tp}")
    src_tp = len(sources)
    if src_tp == 0:
        raise ValueError("at least one source rank is needed")
    by_rank = [{p.name: p for p in src} for src in sources]
    diffs: list[str] = []
    pieces: list[Piece] = []
    scratch = 0
    for t in target:
        have = [m.get(t.name) for m in by_rank]
        missing = [k for k, p in enumerate(have) if p is None]
        kind = rule_for(t.name, rules)
        if missing and not (kind == REPLICATED and have[0] is not None):
            diffs.append(f"{t.name}: missing on source ranks {missing}")
            continue
        shards = [p for p in have if p is not None]
        if any(p.dtype != t.dtype for p in shards):
            diffs.append(f"{t.name}: dtype {shards[0].dtype} on sources != {t.dtype} on target")
            continue
        esize = DTYPE_SIZES[t.dtype]
        dim = _split_dim(kind, len(t.shape))
        if dim is None:  # replicated (or a row rule on a 1-D tensor, e.g. a row bias)
            s0 = shards[0]
            if s0.shape != t.shape:
                diffs.append(f"{t.name}: shape {list(s0.shape)} on rank 0 != {list(t.shape)}")
                continue
            if t.nbytes:
                pieces.append(Piece(t.name, 0, 0, t.nbytes, True, dst_offset=0))
            continue
        shapes = {p.shape for p in shards}
        if len(shapes) != 1:
            diffs.append(f"{t.name}: source shards differ in shape {sorted(shapes)}")
            continue
        sshape = shards[0].shape
        if len(sshape) != len(t.shape) or dim >= len(sshape):  # e.g. a peer's scalar q_proj
            diffs.append(f"{t.name}: {kind} split of {list(sshape)} cannot give {list(t.shape)}")
            continue
        full = sshape[dim] * src_tp
        other_s = sshape[:dim] + sshape[dim + 1 :]
        other_t = t.shape[:dim] + t.shape[dim + 1 :]
        if other_s != other_t or full % target_tp or t.shape[dim] * target_tp != full:
            diffs.append(
                f"{t.name}: {kind} split of {list(sshape)} x{src_tp} cannot give "
                f"{list(t.shape)} as rank {target_rank} of {target_tp}"
            )
            continue
        ws, wt = sshape[dim], t.shape[dim]
        t0, t1 = target_rank * wt, (target_rank + 1) * wt
        inner = math.prod(sshape[dim + 1 :]) * esize  # bytes of one step along dim
        outer = math.prod(sshape[:dim])  # rows before dim (1 for dim 0)
        for k in range(src_tp):
            lo, hi = max(t0, k * ws), min(t1, (k + 1) * ws)
            if lo >= hi:
                continue
            if dim == 0 or outer == 1 or (lo == k * ws and hi == (k + 1) * ws and ws == wt):
                # contiguous on both sides (dim 0, a single row, or whole rows)
                if dim == 0 or outer == 1:
                    pieces.append(
                        Piece(
                            t.name,
                            k,
                            (lo - k * ws) * inner,
                            (hi - lo) * inner,
                            True,
                            dst_offset=(lo - t0) * inner,
                        )
                    )
                else:
                    pieces.append(Piece(t.name, k, 0, t.nbytes, True, dst_offset=0))
                continue
            # row split with partial widths: covering range of the column block
            start = (lo - k * ws) * inner
            end = ((outer - 1) * ws + (hi - k * ws)) * inner
            pieces.append(
                Piece(
                    t.name,
                    k,
                    start,
                    end - start,
                    False,
                    scratch_offset=scratch,
                    rows=outer,
                    src_width=ws * inner // esize,
                    col=0,
                    width=(hi - lo) * inner // esize,
                    dst_col=(lo - t0) * inner // esize,
                )
            )
            scratch += align_up(end - start, ALIGNMENT)
    if diffs:
        shown = "; ".join(diffs[:MAX_REPORTED])
        more = f" (and {len(diffs) - MAX_REPORTED} more)" if len(diffs) > MAX_REPORTED else ""
        raise LayoutMismatch(
            f"cannot reshard TP{src_tp} -> TP{target_tp}: {len(diffs)} differences: {shown}{more}",
            differences=diffs[:MAX_REPORTED],
            count=len(diffs),
            source=f"TP{src_tp}",
        )
    return ReshardPlan(tuple(pieces), scratch, target_rank, target_tp, src_tp)


def segments(
    plan: ReshardPlan,
    sources: Sequence[Sequence[Placement]],
    target: Sequence[Placement],
    *,
    scratch_slab: int,
) -> list[Segment]:
    """Descriptor segments (source = rank): direct pieces into the target's slabs, scratch
    pieces into slab index `scratch_slab`. Runs adjacent on both sides are merged."""
    src_by = [{p.name: p for p in s} for s in sources]
    tgt_by: Mapping[str, Placement] = {p.name: p for p in target}
    segs = []
    for pc in plan.pieces:
        sp = src_by[pc.source][pc.name]
        if pc.direct:
            tp = tgt_by[pc.name]
            segs.append(
                Segment(
                    pc.source,
                    sp.slab,
                    sp.offset + pc.src_offset,
                    tp.slab,
                    tp.offset + pc.dst_offset,
                    pc.nbytes,
                )
            )
        else:
            segs.append(
                Segment(
                    pc.source,
                    sp.slab,
                    sp.offset + pc.src_offset,
                    scratch_slab,
                    pc.scratch_offset,
                    pc.nbytes,
                )
            )
    return joined(segs)


def target_specs(
    sources: Sequence[Sequence[Placement]],
    *,
    target_tp: int,
    rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
) -> list[TensorSpec]:
    """The tensors of one target rank (every rank of `target_tp` has the same shapes),
    from the source ranks' shards: what a target with no layout yet declares before
    its first reshard pull. Order: source rank 0's (slab, offset) order.

    Raises LayoutMismatch when a split dimension does not divide by `target_tp`."""
    src_tp = len(sources)
    diffs: list[str] = []
    out: list[TensorSpec] = []
    for p in sorted(sources[0], key=lambda p: (p.slab, p.offset)):
        dim = _split_dim(rule_for(p.name, rules), len(p.shape))
        if dim is None:
            out.append(p.spec)
            continue
        if dim >= len(p.shape):  # e.g. a peer's scalar q_proj
            diffs.append(f"{p.name}: a {len(p.shape)}-d shard has no dim {dim} to split")
            continue
        full = p.shape[dim] * src_tp
        if full % target_tp:
            diffs.append(f"{p.name}: dim {dim} of {full} does not split over TP{target_tp}")
            continue
        shape = list(p.shape)
        shape[dim] = full // target_tp
        out.append(TensorSpec(p.name, p.dtype, tuple(shape)))
    if diffs:
        raise LayoutMismatch(
            f"cannot reshard TP{src_tp} -> TP{target_tp}: {'; '.join(diffs[:MAX_REPORTED])}",
            differences=diffs[:MAX_REPORTED],
            count=len(diffs),
            source=f"TP{src_tp}",
        )
    return out


def shard(full_shape: Sequence[int], kind: str, rank: int, tp: int) -> tuple[slice, ...]:
    """The index of rank `rank`'s shard of a full tensor (what a direct load takes)."""
    dim = _split_dim(kind, len(full_shape))
    idx = [slice(None)] * len(full_shape)
    if dim is not None:
        w = full_shape[dim] // tp
        idx[dim] = slice(rank * w, (rank + 1) * w)
    return tuple(idx)


def place_from_scratch(piece: Piece, scratch: object, dst: object) -> None:
    """Copy a scratch piece's column block into the target tensor `dst` (torch, any device).

    `scratch` is the scratch buffer as a 1-D uint8 torch tensor."""
    import torch

    assert isinstance(scratch, torch.Tensor) and isinstance(dst, torch.Tensor)
    esize = dst.element_size()
    n = (piece.rows - 1) * piece.src_width + piece.width
    flat = scratch[piece.scratch_offset : piece.scratch_offset + n * esize].view(dst.dtype)
    block = flat.as_strided((piece.rows, piece.width), (piece.src_width, 1))
    rows = dst.reshape(piece.rows, -1)  # a view: dst is contiguous
    rows[:, piece.dst_col : piece.dst_col + piece.width].copy_(block)

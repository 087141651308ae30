"""Plans and prepared READs, kept across refit cycles while nothing they depend on changed.

A plan (planner.py) is a pure function of the sources' and our layouts and the chunk
size; the prepared descriptor lists and READ handles (transport.py) of a plan are a
pure function of the plan, the sources' slabs (their manifests' cache keys) and our
slab addresses. A warm cycle therefore plans and prepares nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from .layout import Layout
from .manifest import Manifest, descriptor_arrays
from .memory import SlabInfo
from .planner import Plan, Segment, build_plan

if TYPE_CHECKING:
    from .peers import PeerCache, Source
    from .transport import NixlTransport, Prepared

# Descriptor groups per peer: one READ handle each. NIXL-NOTES: ~10k descriptors
# posted at once have wedged UCX send queues, so large plans are grouped.
MAX_HANDLES_PER_PEER = 256
# Prepared entries kept (a few sources x active/standby slab sets).
MAX_PREPARED = 16


def handle_groups(n: int) -> list[list[int]]:
    """Descriptor indexes 0..n-1 in at most MAX_HANDLES_PER_PEER contiguous groups."""
    per = -(-n // MAX_HANDLES_PER_PEER)
    return [list(range(i, min(n, i + per))) for i in range(0, n, per)]


@dataclass(frozen=True)
class PreparedReads:
    """The READs of one cycle: per peer a Prepared entry, and for each of its handles the
    plan segments it carries (keyed (endpoint, handle index): what lands when it is DONE)."""

    entries: list[Prepared]
    members: dict[tuple[str, int], list[Segment]]


class _CachedPlan(NamedTuple):
    layout: Layout
    key: tuple
    plan: Plan


@dataclass(frozen=True)
class _Prepped:
    plan: Plan | None  # None: segments planned by the caller (prepare_segments)
    local: Any
    remote: Any
    groups: list[list[int]]
    members: dict[tuple[str, int], list[Segment]]
    key: tuple


class PlanCache:
    def __init__(self, transport: NixlTransport, peers: PeerCache, local_memory: str) -> None:
        self.transport = transport
        self.peers = peers
        self.local_memory = local_memory  # DRAM | VRAM
        self._plan: _CachedPlan | None = None
        self._prepped: dict[tuple, _Prepped] = {}

    def plan(self, srcs: Sequence[Source], layout: Layout, chunk_bytes: int) -> Plan:
        """Raises LayoutMismatch (nothing moved yet). Reused while neither side's layout
        nor slabs changed (the manifests' cache keys cover the sources' fingerprint and
        slab generation; our layout object is compared by identity)."""
        key = (tuple((s.endpoint, s.manifest.cache_key) for s in srcs), chunk_bytes)
        cached = self._plan
        if cached is not None and cached.layout is layout and cached.key == key:
            return cached.plan
        plan = build_plan(
            [s.manifest.tensors for s in srcs],
            layout.placements,
            chunk_bytes=chunk_bytes,
            source_names=[s.endpoint for s in srcs],
        )
        self._plan = _CachedPlan(layout, key, plan)
        self._prepped.clear()
        return plan

    def prepare(
        self, srcs: Sequence[Source], plan: Plan, slabs: Sequence[SlabInfo], generation: int
    ) -> PreparedReads:
        """Prepared READs of `plan` into `slabs` (the active or the standby set)."""
        entries, members = [], {}
        local_addrs = tuple((s.index, s.addr, s.nbytes, s.device_id) for s in slabs)
        for k, src in enumerate(srcs):
            ck = (id(plan), k, src.endpoint, src.manifest.cache_key, generation, local_addrs)
            hit = self._prepped.get(ck)
            if hit is None or hit.plan is not plan:
                segs = plan.for_source(k)
                if not segs:
                    continue
                hit = self._build(
                    src.endpoint, src.manifest, segs, slabs, (generation, local_addrs), plan
                )
                if len(self._prepped) >= MAX_PREPARED:
                    self._prepped.clear()
                self._prepped[ck] = hit
            members.update(hit.members)
            entries.append(self._post(src.endpoint, src.manifest, hit))
        return PreparedReads(entries, members)

    def prepare_segments(
        self,
        endpoint: str,
        manifest: Manifest,
        segs: Sequence[Segment],
        slabs: Sequence[SlabInfo],
        key: tuple,
    ) -> PreparedReads:
        """Prepared READs of segments a caller planned itself (reshard), cached by `key`."""
        ck = ("segments", endpoint, manifest.cache_key, key)
        hit = self._prepped.get(ck)
        if hit is None:
            hit = self._build(endpoint, manifest, segs, slabs, key)
            if len(self._prepped) >= MAX_PREPARED:
                self._prepped.clear()
            self._prepped[ck] = hit
        return PreparedReads([self._post(endpoint, manifest, hit)], dict(hit.members))

    def _build(
        self,
        endpoint: str,
        manifest: Manifest,
        segs: Sequence[Segment],
        slabs: Sequence[SlabInfo],
        local_key: tuple,
        plan: Plan | None = None,
    ) -> _Prepped:
        local = descriptor_arrays([(g.dst_slab, g.dst_offset, g.nbytes) for g in segs], list(slabs))
        remote = descriptor_arrays(
            [(g.src_slab, g.src_offset, g.nbytes) for g in segs], list(manifest.slabs)
        )
        groups = handle_groups(len(segs))
        members = {(endpoint, g): [segs[i] for i in idx] for g, idx in enumerate(groups)}
        key = (manifest.cache_key, hash((tuple(segs), local_key)))
        return _Prepped(plan, local, remote, groups, members, key)

    def _post(self, endpoint: str, manifest: Manifest, hit: _Prepped) -> Prepared:
        remote_mem = manifest.slabs[0].memory if manifest.slabs else "DRAM"
        return self.transport.prepare(
            endpoint,
            hit.key,
            self.peers.metadata(manifest),
            hit.local,
            hit.remote,
            local_mem=self.local_memory,
            remote_mem=remote_mem,
            groups=hit.groups,
        )

"""The reshard pull: build this target's tensor-parallel shard from every source rank.

What it adds to the cycle (cycle.py): the sources are one replica per source rank, in
rank order, and must serve one version; a target with no layout yet declares its
shard's tensors from their manifests; the plan (reshard.py) READs column-parallel
overlaps straight into place and row-parallel ones into registered scratch, from which
`land` copies them into place on the target's device; the fence is each rank's
GetVersion after the READs.

A ReshardPull is kept across refit cycles (the agent holds one per (rank, tp)), so a
cycle whose sources, layouts, slabs and chunk size are unchanged reuses its plan,
prepared descriptor lists, READ handles and scratch; any change re-plans (its cache
key). Scratch is one slab of the agent's memory kind, registered once and kept until
a larger one replaces it or the puller is closed: a registered buffer is never freed
while registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..bounds import check_adopted
from ..cycle import Attempt, Parts, PullContext, Watch
from ..errors import SourceStale
from ..memory import SlabInfo
from ..peers import Source
from ..planner import Segment, chunk
from ..pull import fenced_read, stable_sources
from .reshard import (
    DEFAULT_RULES,
    ReshardPlan,
    place_from_scratch,
    plan_reshard,
    segments,
    target_specs,
)

if TYPE_CHECKING:
    from ..store import SlabSet
    from ..transport import ReadResult


@dataclass
class _Cycle:
    srcs: list[Source]
    prepared: list[Any]
    replanned: bool


class ReshardPull:
    double_buffer = False
    digests_early = True

    def __init__(
        self, parts: Parts, *, target_rank: int, target_tp: int, rules=DEFAULT_RULES
    ) -> None:
        self.parts = parts
        self.target_rank = target_rank
        self.target_tp = target_tp
        self.rules = tuple(rules)
        self.endpoints: list[str] = []
        self._plan_key: tuple | None = None
        self._plan: ReshardPlan | None = None
        self._segs: list[Segment] = []
        self._scratch: SlabSet | None = None
        self._scratch_gen = 0

    def retries(self) -> int:
        return 0

    def sources(self) -> list[str]:
        return list(self.endpoints)

    def for_sources(self, endpoints: Sequence[str]) -> ReshardPull:
        self.endpoints = list(endpoints)
        return self

    def digest_source(self, attempt: Attempt) -> None:
        """A shard no source holds: its digests are computed here (cycle.check_content)."""
        return None

    def details(self, attempt: Attempt) -> dict[str, Any]:
        plan = self._plan
        assert plan is not None
        return {
            "scratch_bytes": plan.scratch_bytes,
            "direct_pieces": len(plan.direct),
            "scratch_pieces": len(plan.scratch),
            "replanned": attempt.state.replanned,
        }

    # -- scratch -----------------------------------------------------------------------
    def _ensure_scratch(self, nbytes: int) -> None:
        if nbytes == 0 or (self._scratch is not None and self._scratch.slabs[0].nbytes >= nbytes):
            return
        self._free_scratch()
        store = self.parts.store
        self._scratch = store.allocate((nbytes,), prefix=store.scratch_prefix)
        self._scratch_gen += 1

    def _free_scratch(self) -> None:
        if self._scratch is None:
            return
        for ep in self.endpoints:  # their prepared lists point into the scratch
            self.parts.transport.drop(ep)
        self._scratch.release(self.parts.transport)
        self._scratch = None

    def _scratch_tensor(self) -> Any:
        import torch

        assert self._scratch is not None
        s = self._scratch.slabs[0]
        return s.tensor() if s.memory == "VRAM" else torch.from_numpy(s.array)

    # -- the cycle's steps ---------------------------------------------------------------
    def prepare(self, ctx: PullContext) -> Attempt:
        parts, store = self.parts, self.parts.store
        srcs = stable_sources(parts, ctx, self.endpoints)
        have = {s.version for s in srcs}
        if len(have) != 1 or "" in have:
            raise SourceStale(f"source ranks disagree or are empty: versions {sorted(have)}")
        (version,) = have
        want = ctx.request.version
        if want is not None and version != want:
            raise SourceStale(f"sources hold {version!r}, not {want!r}", have=version, want=want)
        ctx.phases.mark("sources")
        tensors = [s.manifest.tensors for s in srcs]
        if not store.declared:  # a fresh target takes its shard's shapes from the sources
            specs = target_specs(tensors, target_tp=self.target_tp, rules=self.rules)
            # a shard of its own shapes: held to max_bytes only (no source has its fingerprint)
            check_adopted(specs, replace(ctx.request, fingerprint=None))
            store.declare(specs)
        layout = store.layout
        key = (
            tuple(s.manifest.cache_key for s in srcs),
            tuple(self.endpoints),
            layout.fingerprint,
            store.generation,
            ctx.chunk_bytes,
        )
        replanned = key != self._plan_key
        if replanned:
            self._plan = plan_reshard(
                tensors,
                layout.placements,
                target_rank=self.target_rank,
                target_tp=self.target_tp,
                rules=self.rules,
            )
            self._ensure_scratch(self._plan.scratch_bytes)
            scratch_index = len(store.slabs)
            self._segs = chunk(
                segments(self._plan, tensors, layout.placements, scratch_slab=scratch_index),
                ctx.chunk_bytes,
            )
            self._plan_key = key
        prepared, members = self._prepare(srcs)
        moved = sum(g.nbytes for g in self._segs)
        return Attempt(
            version, moved, moved, len(self._segs), members, _Cycle(srcs, prepared, replanned)
        )

    def _local_slabs(self) -> list[SlabInfo]:
        local = [s.info for s in self.parts.store.slabs]
        if self._scratch is not None:
            si = self._scratch.slabs[0].info
            idx = len(local)
            local.append(SlabInfo(idx, si.addr, si.nbytes, si.memory, si.device_id, si.handle))
        return local

    def _prepare(self, srcs: list[Source]) -> tuple[list[Any], dict]:
        local = self._local_slabs()
        key = (self._plan_key, self._scratch_gen)
        out, members = [], {}
        for k, src in enumerate(srcs):
            segs = [s for s in self._segs if s.source == k]
            if not segs:
                continue
            reads = self.parts.plans.prepare_segments(src.endpoint, src.manifest, segs, local, key)
            out += reads.entries
            members.update(reads.members)
        return out, members

    def transfer(self, ctx: PullContext, attempt: Attempt, watch: Watch) -> ReadResult:
        return fenced_read(self.parts, ctx, attempt.state.srcs, attempt.state.prepared, watch)

    def verify(self, ctx: PullContext, attempt: Attempt) -> None:
        self.parts.peers.fence(attempt.state.srcs, ctx.deadline)

    def land(self, ctx: PullContext, attempt: Attempt) -> None:
        plan = self._plan
        assert plan is not None
        if not plan.scratch:
            return
        views = self.parts.store.views()
        scratch = self._scratch_tensor()
        for pc in plan.scratch:
            place_from_scratch(pc, scratch, views[pc.name])
        if self.parts.store.memory == "cuda":
            import torch

            torch.cuda.synchronize(self.parts.store.device)

    def close(self) -> None:
        """Release the scratch slab (the agent keeps its slabs)."""
        self._free_scratch()

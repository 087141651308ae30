"""Run a reshard pull on a target Agent: versions -> plan -> READs -> scratch copies -> fence.

Uses the Agent's NIXL engine and slabs (the same primitives as a plain pull),
so prepared descriptor lists, READ handles and remote agents are reused across
refit cycles while the sources' identity, their layouts, our layout, the plan
and the scratch buffer are unchanged; any change re-plans and re-prepares.

Scratch (for row-parallel pieces) is one slab of the agent's memory kind,
registered once and kept referenced until it is replaced by a larger one or the
puller is closed: a registered buffer is never freed while registered.

A cycle behaves like a plain pull (pull.run_pull) towards the engine and the job
runner: a target with no layout yet declares its shard's tensors first; the engine
is paused (quiesce) before the first write and resumed after, ok or not;
`cancel` is looked at every CHECK_INTERVAL_S (in-flight READs are aborted, the
slabs serve no version, the engine resumes with ok=False, Cancelled is raised);
`progress(bytes)` reports bytes landed from the pulling thread.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..agent import MAX_HANDLES_PER_PEER
from ..errors import Cancelled, SourceStale, VersionChanged
from ..manifest import Manifest, descriptor_arrays
from ..peer import AgentClient
from ..planner import chunk
from ..slabs import SlabInfo, create_slabs
from .reshard import (
    DEFAULT_RULES,
    ReshardPlan,
    place_from_scratch,
    plan_reshard,
    segments,
    target_specs,
)

WRITING_BACKOFF_S = 0.01
# Cancellation and progress are looked at this often while READs are in flight
# (the same tick as pull.CHECK_INTERVAL_S).
CHECK_INTERVAL_S = 0.05


@dataclass
class ReshardResult:
    version: str
    bytes: int  # bytes READ (scratch pieces include the skipped columns they cover)
    seconds: float  # READs
    total_s: float
    descriptors: int
    scratch_bytes: int
    direct_pieces: int
    scratch_pieces: int
    replanned: bool
    stats: dict[str, int] = field(default_factory=dict)


class ReshardPuller:
    """A target's reshard pulls from TP-sharded sources (endpoints in source-rank order)."""

    def __init__(self, agent: Any, *, target_rank: int, target_tp: int, rules=DEFAULT_RULES):
        self.agent = agent
        self.target_rank = target_rank
        self.target_tp = target_tp
        self.rules = tuple(rules)
        self._clients: dict[str, AgentClient] = {}
        self._manifests: dict[str, Manifest] = {}
        self._plan_key: tuple | None = None
        self._plan: ReshardPlan | None = None
        self._segs: list[Any] = []
        self._scratch: Any = None
        self._scratch_reg: Any = None
        self._scratch_gen = 0

    # -- sources ---------------------------------------------------------------------
    def _client(self, ep: str) -> AgentClient:
        c = self._clients.get(ep)
        if c is None:
            c = self._clients[ep] = AgentClient(ep, self.agent.token())
        return c

    def _versions(
        self, endpoints: Sequence[str], deadline: float, cancel: threading.Event | None = None
    ) -> list[Any]:
        while True:
            _check_cancel(cancel)
            infos = [self._client(ep).version() for ep in endpoints]
            if not any(int(i.epoch) % 2 for i in infos):
                return infos
            if time.monotonic() > deadline:
                raise SourceStale("a source rank was still being written at the deadline")
            time.sleep(WRITING_BACKOFF_S)

    def _manifest(self, ep: str, info: Any) -> Manifest:
        key = f"{info.agent}#{info.generation}#{info.fingerprint}"
        man = self._manifests.get(ep)
        if man is None or man.cache_key != key:
            man = self._client(ep).manifest()
            if man.cache_key != key:
                raise VersionChanged(f"source {ep} re-declared its layout while we read it")
            self._manifests[ep] = man
        return man

    # -- scratch -----------------------------------------------------------------------
    def _ensure_scratch(self, nbytes: int) -> None:
        if nbytes == 0 or (self._scratch is not None and self._scratch.nbytes >= nbytes):
            return
        self._free_scratch()
        cfg = self.agent.config
        (slab,) = create_slabs(
            (nbytes,),
            cfg.memory,
            prefix=f"{cfg.shm_prefix}-{cfg.pod}-scratch",
            device=cfg.device,
        )
        mem = "VRAM" if cfg.memory == "cuda" else "DRAM"
        self._scratch_reg = self.agent.engine.register(
            [(slab.addr, slab.nbytes, slab.device_id)], mem
        )
        self._scratch = slab
        self._scratch_gen += 1

    def _free_scratch(self) -> None:
        if self._scratch is None:
            return
        for ep in list(self._manifests):  # their prepared lists point into the scratch
            self.agent.engine.drop(ep)
        self.agent.engine.deregister(self._scratch_reg, 1)
        self._scratch.close()
        self._scratch = self._scratch_reg = None

    def _scratch_tensor(self) -> Any:
        import torch

        s = self._scratch
        return s.tensor() if s.memory == "VRAM" else torch.from_numpy(s.array)

    # -- one cycle ---------------------------------------------------------------------
    def pull(
        self,
        endpoints: Sequence[str],
        *,
        version: str | None = None,
        timeout_s: float = 60.0,
        chunk_bytes: int | None = None,
        quiesce: bool = False,
        quiesce_timeout_s: float = 30.0,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
        max_gbps: float | None = None,
    ) -> ReshardResult:
        """One reshard cycle from `endpoints` (one per source rank, in rank order).

        Raises LayoutMismatch before any byte moves, SourceStale / VersionChanged,
        EngineNotQuiesced, TransferTimeout past `timeout_s`, Cancelled; never
        publishes a partial or mixed result."""
        agent = self.agent
        if agent.config.memory == "cuda":
            agent._cuda_thread_init()
        with agent._pull_lock:
            agent._pulling = True
            try:
                return self._pull(
                    endpoints, version, timeout_s, chunk_bytes, quiesce, quiesce_timeout_s,
                    cancel, progress, max_gbps,
                )
            finally:
                agent._pulling = False

    def _pull(
        self,
        endpoints: Sequence[str],
        version: str | None,
        timeout_s: float,
        chunk_bytes: int | None,
        quiesce: bool,
        quiesce_timeout_s: float,
        cancel: threading.Event | None,
        progress: Callable[[int], None] | None,
        max_gbps: float | None,
    ) -> ReshardResult:
        agent = self.agent
        t_start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        chunk_bytes = chunk_bytes or agent.config.chunk_bytes
        stats0 = agent.engine.stats.as_dict()
        infos = self._versions(endpoints, deadline, cancel)
        have = {i.version for i in infos}
        if len(have) != 1 or "" in have:
            raise SourceStale(f"source ranks disagree or are empty: versions {sorted(have)}")
        (ver,) = have
        if version not in (None, "", "latest") and ver != version:
            raise SourceStale(f"sources hold {ver!r}, not {version!r}", have=ver, want=version)
        mans = [self._manifest(ep, i) for ep, i in zip(endpoints, infos, strict=True)]
        if agent._layout is None:  # a fresh target takes its shard's shapes from the sources
            agent.declare(
                target_specs([m.tensors for m in mans], target_tp=self.target_tp, rules=self.rules)
            )
        layout = agent.layout
        key = (
            tuple(m.cache_key for m in mans),
            tuple(endpoints),
            layout.fingerprint,
            agent._generation,
            chunk_bytes,
        )
        replanned = key != self._plan_key
        if replanned:
            self._plan = plan_reshard(
                [m.tensors for m in mans],
                layout.placements,
                target_rank=self.target_rank,
                target_tp=self.target_tp,
                rules=self.rules,
            )
            self._ensure_scratch(self._plan.scratch_bytes)
            scratch_index = len(agent.slabs)
            self._segs = chunk(
                segments(
                    self._plan,
                    [m.tensors for m in mans],
                    layout.placements,
                    scratch_slab=scratch_index,
                ),
                chunk_bytes,
            )
            self._plan_key = key
        plan = self._plan
        assert plan is not None
        prepared = self._prepare(endpoints, mans)
        _check_cancel(cancel)
        refit_id = agent.link.pause(ver, quiesce_timeout_s, cancel) if quiesce else None
        ok = False
        landed = [0]

        def on_complete(entry: Any, i: int) -> None:
            landed[0] += entry.handle_bytes[i]

        reported = [-1]

        def watch() -> None:
            _check_cancel(cancel)
            if progress is not None and landed[0] != reported[0]:
                reported[0] = landed[0]
                progress(landed[0])

        try:
            _check_cancel(cancel)
            agent.begin_write()
            res = agent.engine.read(
                prepared,
                deadline=deadline,
                check=watch,
                check_interval_s=CHECK_INTERVAL_S,
                max_inflight=agent.config.max_inflight,
                max_bytes_per_s=max_gbps * 1e9 if max_gbps else None,
                on_complete=on_complete,
            )
            if plan.scratch:
                views = agent.views()
                scratch = self._scratch_tensor()
                for pc in plan.scratch:
                    place_from_scratch(pc, scratch, views[pc.name])
                if agent.config.memory == "cuda":
                    import torch

                    torch.cuda.synchronize(agent.config.device)
            after = [self._client(ep).version() for ep in endpoints]
            for a, b in zip(infos, after, strict=True):
                if (a.version, a.epoch, a.agent, a.generation) != (
                    b.version,
                    b.epoch,
                    b.agent,
                    b.generation,
                ):
                    raise VersionChanged(
                        f"a source rank changed during the reshard pull: had {a.version!r}"
                    )
            _check_cancel(cancel)
            agent.publish(ver)
            ok = True
            if progress is not None:
                progress(res.bytes)
        finally:
            if not ok:
                agent._mark_failed_pull()
            agent.link.resume(refit_id, ver, ok)
        stats1 = agent.engine.stats.as_dict()
        return ReshardResult(
            version=ver,
            bytes=res.bytes,
            seconds=res.seconds,
            total_s=time.perf_counter() - t_start,
            descriptors=len(self._segs),
            scratch_bytes=plan.scratch_bytes,
            direct_pieces=len(plan.direct),
            scratch_pieces=len(plan.scratch),
            replanned=replanned,
            stats={k: stats1[k] - stats0[k] for k in stats1},
        )

    def _prepare(self, endpoints: Sequence[str], mans: list[Manifest]) -> list[Any]:
        agent = self.agent
        local_slabs: dict[int, SlabInfo] = {s.info.index: s.info for s in agent.slabs}
        if self._scratch is not None:
            si = self._scratch.info
            idx = len(agent.slabs)
            local_slabs[idx] = SlabInfo(idx, si.addr, si.nbytes, si.memory, si.device_id, si.handle)
        local_mem = "VRAM" if agent.config.memory == "cuda" else "DRAM"
        digest = hashlib.sha256(repr((self._plan_key, self._scratch_gen)).encode()).hexdigest()
        out = []
        for k, (ep, man) in enumerate(zip(endpoints, mans, strict=True)):
            segs = [s for s in self._segs if s.source == k]
            if not segs:
                continue
            local = descriptor_arrays(
                [(s.dst_slab, s.dst_offset, s.nbytes) for s in segs], local_slabs
            )
            remote = descriptor_arrays(
                [(s.src_slab, s.src_offset, s.nbytes) for s in segs], list(man.slabs)
            )
            n = len(segs)
            per = -(-n // MAX_HANDLES_PER_PEER)
            groups = [list(range(i, min(n, i + per))) for i in range(0, n, per)]
            remote_mem = man.slabs[0].memory if man.slabs else "DRAM"
            out.append(
                agent.engine.prepare(
                    ep,
                    (man.cache_key, "reshard", digest),
                    lambda m=man: m.nixl_metadata,
                    local,
                    remote,
                    local_mem=local_mem,
                    remote_mem=remote_mem,
                    groups=groups,
                )
            )
        return out

    def close(self) -> None:
        """Release the scratch slab and the gRPC clients (the agent keeps its slabs)."""
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._free_scratch()


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the reshard pull was cancelled")

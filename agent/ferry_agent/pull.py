"""The direct pull: READs from one or more sources that serve a version (striped).

What it adds to the cycle (cycle.py): the sources must all serve one version under
one layout fingerprint (a source mid-write is waited for, up to the deadline); a
fresh target adopts the first source's layout; the plan pairs by name and stripes
chunks across sources; the fence is each source's version header (or GetVersion),
looked at while READs are in flight and once after the last one landed. A version
change makes a "latest" pull start over, up to its retries. Sources on our own GPU
are copied through CUDA IPC instead of READ over NIXL (ipc.py); the result says which
(`details["transport"]`), and a NIXL pull that would run over TCP where a faster path
exists is warned about (fallback.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .bounds import check_adopted
from .cycle import WRITING_BACKOFF_S, Attempt, Parts, PullContext, Watch
from .errors import SourceStale
from .fallback import Peer as FallbackPeer
from .ipc import TRANSPORT

if TYPE_CHECKING:
    from .memory import SlabInfo
    from .peers import Source
    from .planner import Segment
    from .plans import PreparedReads
    from .transport import ReadResult


def check_sources(srcs: Sequence[Source], want: str | None) -> str:
    """The one version all sources serve (and `want`, if given), else SourceStale."""
    versions = {s.version for s in srcs}
    fps = {s.manifest.fingerprint for s in srcs}
    if any(not s.version for s in srcs):
        empty = [s.endpoint for s in srcs if not s.version]
        raise SourceStale(f"sources {empty} have not published a version", sources=empty)
    if len(fps) > 1:
        raise SourceStale(f"sources disagree on the layout fingerprint: {sorted(fps)}")
    if len(versions) > 1:
        raise SourceStale(f"sources disagree on the version: {sorted(versions)}")
    have = versions.pop()
    if want is not None and have != want:
        raise SourceStale(f"sources hold version {have!r}, not {want!r}", have=have, want=want)
    return have


def stable_sources(parts: Parts, ctx: PullContext, endpoints: Sequence[str]) -> list[Source]:
    """What each source holds, once none of them is mid-write (SourceStale at the deadline)."""
    while True:
        ctx.check_cancel()
        srcs = [parts.peers.current(ep) for ep in endpoints]
        writing = [s.endpoint for s in srcs if s.writing]
        if not writing:
            return srcs
        if time.monotonic() > ctx.deadline:
            raise SourceStale(
                f"sources {writing} were still being written at the deadline", sources=writing
            )
        time.sleep(WRITING_BACKOFF_S)


def adopt_layout(parts: Parts, ctx: PullContext, tensors: Sequence[Any]) -> None:
    """A fresh replica takes its source's layout (its engine attaches later), within
    the request's bounds and the agent's (bounds.py: refused before allocating)."""
    order = sorted(tensors, key=lambda p: (p.slab, p.offset))
    specs = [p.spec for p in order]
    check_adopted(specs, ctx.request)  # LayoutTooLarge / LayoutMismatch
    parts.store.declare(specs)
    ctx.register_s = parts.store.last_declare.register_s if parts.store.last_declare else 0.0


STALL_FLOOR_BYTES_PER_S = 1e9  # an unpaced link slower than this may need a larger stall_timeout_s


def stall_window(ctx: PullContext, max_inflight: int, total: int) -> float:
    """How long a pull may land nothing before it counts as stalled: the request's
    stall timeout, plus the time the first READ window (up to max_inflight chunks in
    flight at once, none of which lands until it completes) needs at the pace cap, or
    at STALL_FLOOR_BYTES_PER_S unpaced."""
    window = min(total, max_inflight * ctx.chunk_bytes)
    rate = ctx.request.max_gbps * 1e9 if ctx.request.max_gbps else STALL_FLOOR_BYTES_PER_S
    return ctx.request.stall_timeout_s + window / rate


def fenced_read(
    parts: Parts, ctx: PullContext, srcs: Sequence[Source], entries: Sequence[Any], watch: Watch
) -> ReadResult:
    """The prepared READs, with the sources' fence looked at while they are in flight."""
    watch.fence = functools.partial(parts.peers.fence, srcs, ctx.deadline)
    watch.stall_s = stall_window(ctx, parts.max_inflight, watch.tracker.bytes_total)
    return parts.transport.read(
        entries,
        check=watch,
        max_inflight=parts.max_inflight,
        on_complete=watch.tracker.on_complete,
        **ctx.read_limits(),
    )


@dataclass(frozen=True)
class _Reads:
    """A NIXL attempt: the sources and the prepared READs."""

    srcs: list[Source]
    reads: PreparedReads


@dataclass(frozen=True)
class _Copies:
    """A same-GPU attempt: the sources, our slabs, and each source's segments to copy."""

    srcs: list[Source]
    local: list[SlabInfo]
    work: list[tuple[str, list[Segment]]]


class DirectPull:
    digests_early = True

    def __init__(self, parts: Parts, endpoints: Sequence[str], double_buffer: bool) -> None:
        self.parts = parts
        self.endpoints = list(endpoints)
        self.double_buffer = double_buffer
        self._retries = 0

    def retries(self) -> int:
        return self._retries

    def sources(self) -> list[str]:
        return list(self.endpoints)

    def digest_source(self, attempt: Attempt) -> Source:
        return attempt.state.srcs[0]  # every source serves the one version (check_sources)

    def details(self, attempt: Attempt) -> dict[str, Any]:
        return {"transport": TRANSPORT if isinstance(attempt.state, _Copies) else "nixl"}

    def prepare(self, ctx: PullContext) -> Attempt:
        parts = self.parts
        self._retries = ctx.request.retries if ctx.request.version is None else 0
        srcs = stable_sources(parts, ctx, self.endpoints)
        have = check_sources(srcs, ctx.request.version)
        ctx.phases.mark("sources")
        if not parts.store.declared:
            adopt_layout(parts, ctx, srcs[0].manifest.tensors)
        plan = parts.plans.plan(srcs, parts.store.layout, ctx.chunk_bytes)  # LayoutMismatch
        local = [
            s.info for s in (parts.store.standby() if self.double_buffer else parts.store.slabs)
        ]
        if self._same_gpu(srcs):
            work = [(s.endpoint, plan.for_source(k)) for k, s in enumerate(srcs)]
            state = _Copies(srcs, local, work)
            return Attempt(have, plan.bytes, plan.moved_bytes, plan.descriptors, {}, state)
        if parts.fallback is not None:
            for src in srcs:
                m = src.manifest
                parts.fallback.check(src.endpoint, FallbackPeer(m.host_id, m.device, m.memory))
        reads = parts.plans.prepare(srcs, plan, local, parts.store.generation)
        return Attempt(
            have, plan.bytes, plan.moved_bytes, plan.descriptors, reads.members, _Reads(srcs, reads)
        )

    def _same_gpu(self, srcs: Sequence[Source]) -> bool:
        """Every source is on our GPU and its slabs open through CUDA IPC."""
        ipc, here = self.parts.ipc, self.parts.locality
        if ipc is None or not all(here.same_gpu(s.manifest) for s in srcs):
            return False
        return all(ipc.open(s.endpoint, s.manifest) for s in srcs)

    def transfer(self, ctx: PullContext, attempt: Attempt, watch: Watch) -> ReadResult:
        st = attempt.state
        if isinstance(st, _Copies):  # milliseconds: fenced before and after, not during
            assert self.parts.ipc is not None
            return self.parts.ipc.copy(
                st.work,
                st.local,
                deadline=ctx.deadline,
                check=watch,
                on_landed=watch.tracker.landed,
            )
        return fenced_read(self.parts, ctx, st.srcs, st.reads.entries, watch)

    def verify(self, ctx: PullContext, attempt: Attempt) -> None:
        self.parts.peers.fence(attempt.state.srcs, ctx.deadline)

    def land(self, ctx: PullContext, attempt: Attempt) -> None:
        pass

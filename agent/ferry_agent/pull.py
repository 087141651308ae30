"""One pull, as a target: versions -> plan -> prepared lists -> READs -> version fence.

The fence: every source's (version, epoch) is read before the first READ, polled
while READs are in flight, and read again after the last one landed. Any change
means the bytes may mix two versions: the pull is retried (version "latest")
or fails with VersionChanged; it never reports success.

Warm cycles fence one-sidedly: each source keeps (nonce, epoch, generation) in a
small NIXL-registered header, and every change of version, write state or slabs
bumps its epoch. A target that already holds the source's manifest READs that
header before its data READs and again after them (the words must equal what it
saw when it last asked GetVersion), so a warm cycle makes no RPC. GetVersion (and
the manifest when the layout changed) is only called when the header differs,
cannot be read, or the source is new.

Double buffer: the READs land in the standby slab set while the engine keeps
reading (and peers keep pulling) the active one; only the swap is paused for.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import Cancelled, PeerUnavailable, SourceStale, TransferTimeout, VersionChanged
from .relay import PullTracker

if TYPE_CHECKING:
    from .agent import Agent, PullResult, _Source

# How often a source's version is polled while READs are in flight; cancellation
# and progress are looked at on the same tick.
CHECK_INTERVAL_S = 0.05
# How long to wait between looks at a source that is mid-write.
WRITING_BACKOFF_S = 0.01


@dataclass
class PullOptions:
    want: str | None
    deadline: float  # time.monotonic()
    chunk_bytes: int
    max_gbps: float | None = None
    retries: int = 2
    quiesce: bool = False
    quiesce_timeout_s: float = 30.0
    cancel: threading.Event | None = None
    progress: Callable[[int], None] | None = None
    double_buffer: bool = False

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the pull was cancelled")

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise TransferTimeout(f"{what} at the deadline")


class Watch:
    """Runs on the pulling thread every CHECK_INTERVAL_S while READs are in flight:
    cancellation first, then progress (bytes landed so far), then the source fence."""

    def __init__(
        self, opts: PullOptions, tracker: PullTracker, fence: Callable[[], None] | None = None
    ):
        self.opts, self.tracker, self.fence = opts, tracker, fence
        self.reported = -1

    def report(self) -> None:
        done = self.tracker.bytes_done
        if self.opts.progress is not None and done != self.reported:
            self.reported = done
            self.opts.progress(done)

    def __call__(self) -> None:
        self.opts.check_cancel()
        self.report()
        if self.fence is not None:
            self.fence()


class Phases:
    """Where one pull cycle's time went (seconds per step of the last attempt): the
    READs themselves are `read`; everything else is the cycle's overhead."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.spent: dict[str, float] = {}

    def start(self) -> None:  # a retried attempt reports its own steps
        self.t, self.spent = time.perf_counter(), {}

    def mark(self, step: str) -> dict[str, float]:
        now = time.perf_counter()
        self.spent[step] = self.spent.get(step, 0.0) + now - self.t
        self.t = now
        return self.spent


def _stable_sources(agent: Agent, endpoints: list[str], opts: PullOptions) -> list[_Source]:
    while True:
        opts.check_cancel()
        # PeerUnavailable: run_pull forgets the peer
        srcs = [agent._source_cached(ep) or agent._source(ep, agent._peer(ep)) for ep in endpoints]
        writing = [s.endpoint for s in srcs if s.epoch % 2]
        if not writing:
            return srcs
        if time.monotonic() > opts.deadline:
            raise SourceStale(
                f"sources {writing} were still being written at the deadline", sources=writing
            )
        time.sleep(WRITING_BACKOFF_S)


def _fence(agent: Agent, srcs: list[_Source], deadline: float) -> None:
    for s in srcs:
        got = agent.read_header(s)
        if got is not None:
            words = got[0]
            if words != s.words:
                now = "being written" if words[1] % 2 else "a newer version or layout"
                raise VersionChanged(
                    f"source {s.endpoint} changed during the pull: had {s.version!r}, {now}",
                    endpoint=s.endpoint,
                    had=s.version,
                    now="",
                )
            continue
        v = s.client.version(timeout=max(0.2, min(5.0, deadline - time.monotonic())))
        key = f"{v.agent}#{v.generation}#{v.fingerprint}"
        if (v.version, int(v.epoch), key) != (s.version, s.epoch, s.manifest.cache_key):
            state = "being written" if int(v.epoch) % 2 else f"now {v.version!r}"
            raise VersionChanged(
                f"source {s.endpoint} changed during the pull: had {s.version!r}, {state}",
                endpoint=s.endpoint,
                had=s.version,
                now=v.version,
            )


def adopt_layout(agent: Agent, tensors: Any) -> float:
    """A fresh replica takes its source's layout (its engine attaches later)."""
    order = sorted(tensors, key=lambda p: (p.slab, p.offset))
    agent.declare([p.spec for p in order])
    return agent.register_s


def run_pull(agent: Agent, endpoints: list[str], opts: PullOptions) -> PullResult:
    if not endpoints:
        raise ValueError("pull needs at least one source")
    t_start = time.perf_counter()
    phases = Phases()
    stats0 = agent.engine.stats.as_dict()
    register_s = 0.0
    refit_id = None
    ok = False
    have = opts.want or ""
    writing = False
    attempts = 0
    tracker: PullTracker | None = None
    try:
        while True:
            attempts += 1
            phases.start()
            srcs = _stable_sources(agent, endpoints, opts)
            have = check_sources(srcs, opts.want)
            phases.mark("sources")
            if agent._layout is None:
                register_s = adopt_layout(agent, srcs[0].manifest.tensors)
            plan = agent._plan(srcs, opts.chunk_bytes)  # LayoutMismatch: nothing written yet
            local = agent._standby_slabs() if opts.double_buffer else agent.slabs
            prepared, members = agent._prepare(srcs, plan, local)
            tracker = PullTracker(have, plan.moved_bytes, members)
            phases.mark("plan")
            if not opts.double_buffer:
                if opts.quiesce and refit_id is None:
                    refit_id = agent.link.pause(have, opts.quiesce_timeout_s, opts.cancel)
                agent.begin_write()
                writing = True
                agent._track(tracker)  # downstream relays may follow this pull
            opts.check_cancel()
            phases.mark("begin")
            try:
                res = agent.engine.read(
                    prepared,
                    deadline=opts.deadline,
                    check=Watch(
                        opts, tracker, functools.partial(_fence, agent, srcs, opts.deadline)
                    ),
                    check_interval_s=CHECK_INTERVAL_S,
                    max_inflight=agent.config.max_inflight,
                    max_bytes_per_s=opts.max_gbps * 1e9 if opts.max_gbps else None,
                    on_complete=tracker.on_complete,
                )
                phases.mark("read")
                _fence(agent, srcs, opts.deadline)
                phases.mark("fence")
            except VersionChanged:
                tracker.finish(ok=False)
                if writing:
                    agent._mark_failed_pull()
                    writing = False
                if opts.want is None and attempts <= opts.retries:
                    continue
                raise
            if opts.progress is not None:
                opts.progress(plan.moved_bytes)
            if opts.double_buffer:
                if opts.quiesce:
                    refit_id = agent.link.pause(have, opts.quiesce_timeout_s, opts.cancel)
                opts.check_cancel()
                agent._swap(have)
            else:
                agent.publish(have)
            writing = False
            ok = True
            tracker.finish(ok=True, epoch=agent.version_info()["epoch"])
            phases.mark("publish")
            return finish_result(
                agent, plan, res, attempts, endpoints, register_s, t_start, stats0, phases
            )
    except PeerUnavailable as exc:
        agent._peers.pop(str(exc.fields.get("endpoint", "")), None)
        raise
    finally:
        if tracker is not None and not ok:
            tracker.finish(ok=False)
        if writing:
            agent._mark_failed_pull()
        gen = agent.version_info()["generation"] if opts.double_buffer and ok else None
        agent.link.resume(refit_id, have, ok, gen)


def finish_result(
    agent: Agent,
    plan: Any,
    res: Any,
    attempts: int,
    endpoints: list[str],
    register_s: float,
    t_start: float,
    stats0: dict[str, int],
    phases: Phases | None = None,
) -> PullResult:
    from .agent import PullResult

    stats1 = agent.engine.stats.as_dict()
    m = agent.metrics
    m.bytes_moved.labels("in").inc(plan.bytes)
    m.transfer_seconds.observe(res.seconds)
    m.transfer_gbps.set(plan.bytes / res.seconds / 1e9 if res.seconds else 0)
    m.descriptors.set(plan.descriptors)
    if stats1["dlists_reused"] > stats0["dlists_reused"]:
        m.dlists_reused.inc()
    return PullResult(
        version=agent.version_info()["version"],
        bytes=plan.bytes,
        seconds=res.seconds,
        descriptors=plan.descriptors,
        attempts=attempts,
        sources=list(endpoints),
        register_s=register_s,
        total_s=time.perf_counter() - t_start,
        source_bytes=dict(res.per_peer_bytes),
        phases_s=phases.mark("finish") if phases is not None else {},
        stats={k: stats1[k] - stats0[k] for k in stats1}
        | {"total_" + k: v for k, v in stats1.items()},
    )


def check_sources(srcs: list[_Source], want: str | None) -> str:
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

"""One pull, as a target: versions -> plan -> prepared lists -> READs -> version fence.

The fence: every source's (version, epoch) is read before the first READ, polled
while READs are in flight, and read again after the last one landed. Any change
means the bytes may mix two versions: the pull is retried (version "latest")
or fails with VersionChanged; it never reports success.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

from .errors import PeerUnavailable, SourceStale, VersionChanged
from .layout import TensorSpec

if TYPE_CHECKING:
    from .agent import Agent, PullResult, _Source

# How often a source's version is polled while READs are in flight.
CHECK_INTERVAL_S = 0.05
# How long to wait between looks at a source that is mid-write.
WRITING_BACKOFF_S = 0.01


def _stable_sources(agent: Agent, endpoints: list[str], deadline: float) -> list[_Source]:
    while True:
        try:
            srcs = [agent._source(ep, agent._peer(ep)) for ep in endpoints]
        except PeerUnavailable as exc:
            agent._peers.pop(str(exc.fields.get("endpoint", "")), None)
            raise
        writing = [s.endpoint for s in srcs if s.epoch % 2]
        if not writing:
            return srcs
        if time.monotonic() > deadline:
            raise SourceStale(
                f"sources {writing} were still being written at the deadline", sources=writing
            )
        time.sleep(WRITING_BACKOFF_S)


def _fence(srcs: list[_Source], deadline: float) -> None:
    for s in srcs:
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


def run_pull(
    agent: Agent,
    endpoints: list[str],
    want: str | None,
    deadline: float,
    chunk_bytes: int,
    max_gbps: float | None,
    retries: int,
    quiesce: bool,
    quiesce_timeout_s: float,
) -> PullResult:
    from .agent import PullResult, check_sources

    if not endpoints:
        raise ValueError("pull needs at least one source")
    t_start = time.perf_counter()
    stats0 = agent.engine.stats.as_dict()
    register_s = 0.0
    refit_id = None
    ok = False
    have = want or ""
    writing = False
    attempts = 0
    try:
        while True:
            attempts += 1
            srcs = _stable_sources(agent, endpoints, deadline)
            have = check_sources(srcs, want)
            if agent._layout is None:
                # A fresh replica: adopt the source's layout (its engine attaches later).
                order = sorted(srcs[0].manifest.tensors, key=lambda p: (p.slab, p.offset))
                agent.declare([TensorSpec(p.name, p.dtype, p.shape) for p in order])
                register_s = agent.register_s
            plan = agent._plan(srcs, chunk_bytes)  # LayoutMismatch: nothing written yet
            prepared = agent._prepare(srcs, plan)
            if quiesce and refit_id is None:
                refit_id = agent.link.pause(have, quiesce_timeout_s)
            agent.begin_write()
            writing = True
            try:
                res = agent.engine.read(
                    prepared,
                    deadline=deadline,
                    check=functools.partial(_fence, srcs, deadline),
                    check_interval_s=CHECK_INTERVAL_S,
                    max_inflight=agent.config.max_inflight,
                    max_bytes_per_s=max_gbps * 1e9 if max_gbps else None,
                )
                _fence(srcs, deadline)
            except VersionChanged:
                agent._mark_failed_pull()
                writing = False
                if want is None and attempts <= retries:
                    continue
                raise
            agent.publish(have)
            writing = False
            ok = True
            stats1 = agent.engine.stats.as_dict()
            m = agent.metrics
            m.bytes_moved.labels("in").inc(plan.bytes)
            m.transfer_seconds.observe(res.seconds)
            m.transfer_gbps.set(plan.bytes / res.seconds / 1e9 if res.seconds else 0)
            m.descriptors.set(plan.descriptors)
            if stats1["dlists_reused"] > stats0["dlists_reused"]:
                m.dlists_reused.inc()
            return PullResult(
                version=have,
                bytes=plan.bytes,
                seconds=res.seconds,
                descriptors=plan.descriptors,
                attempts=attempts,
                sources=list(endpoints),
                register_s=register_s,
                total_s=time.perf_counter() - t_start,
                source_bytes=dict(res.per_peer_bytes),
                stats={k: stats1[k] - stats0[k] for k in stats1}
                | {"total_" + k: v for k, v in stats1.items()},
            )
    except PeerUnavailable as exc:
        agent._peers.pop(str(exc.fields.get("endpoint", "")), None)
        raise
    finally:
        if writing:
            agent._mark_failed_pull()
        agent.link.resume(refit_id, have, ok)

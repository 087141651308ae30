"""Chunk-pipelined relay: a chain link reads from an upstream target while it still pulls.

Upstream side: a PullTracker records which byte ranges of our slabs have landed
for the pull in progress (one id per pull attempt); the RelayStatus RPC serves
it. Downstream side (run_relay): adopt the upstream's layout as soon as it is
declared, then repeatedly ask RelayStatus and READ only the descriptor groups
whose source bytes lie inside completed ranges; at the end require that the
upstream finished that same pull and now serves the version (its published
epoch), else RelayBroken / VersionChanged: the operator re-links the target.
"""

from __future__ import annotations

import bisect
import functools
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import NotDeclared, PeerUnavailable, RelayBroken, VersionChanged
from .planner import Segment

if TYPE_CHECKING:
    from .agent import Agent, PullResult
    from .pull import PullOptions

# How often a link asks its upstream whether it started pulling (once per link).
RELAY_POLL_S = 0.01
# While following, each RelayStatus is a long poll: the upstream answers as soon as
# more bytes landed (or the pull ended), so a link learns of a chunk one call after
# it lands instead of half a poll period later. The wait is bounded so the link
# still looks at cancellation, progress and its deadline this often.
RELAY_WAIT_S = 0.05


# -- ranges (pure) -----------------------------------------------------------------
def merge(ranges: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(slab, offset, nbytes) ranges sorted and merged where they touch or overlap."""
    out: list[tuple[int, int, int]] = []
    for slab, off, n in sorted(r for r in ranges if r[2] > 0):
        if out and out[-1][0] == slab and off <= out[-1][1] + out[-1][2]:
            s, o, m = out[-1]
            out[-1] = (s, o, max(o + m, off + n) - o)
        else:
            out.append((slab, off, n))
    return out


def covered(merged: Sequence[tuple[int, int, int]], slab: int, off: int, n: int) -> bool:
    """Is [off, off+n) of `slab` inside one merged range?"""
    if n == 0:
        return True
    i = bisect.bisect_right(merged, (slab, off, 1 << 64)) - 1
    if i < 0:
        return False
    s, o, m = merged[i]
    return s == slab and o <= off and off + n <= o + m


# -- upstream side -----------------------------------------------------------------
class PullTracker:
    """Which of our slab ranges hold the version being pulled; updated from NIXL's
    posting threads as each READ handle completes (see NixlEngine.read on_complete)."""

    def __init__(self, version: str, total: int, members: dict[tuple[str, int], list[Segment]]):
        self.pull_id = secrets.token_hex(8)
        self.version = version
        self.bytes_total = total
        self.state = "Pulling"
        self.epoch = 0  # our published epoch once Done
        self._members = members
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._landed: list[tuple[int, int, int]] = []
        self.bytes_done = 0

    def on_complete(self, entry: Any, i: int) -> None:
        self.landed(self._members.get((entry.peer, i), []))

    def landed(self, segs: Sequence[Segment]) -> None:
        with self._lock:
            self._landed.extend((g.dst_slab, g.dst_offset, g.nbytes) for g in segs)
            self.bytes_done += sum(g.nbytes for g in segs)
            if len(self._landed) > 64:
                self._landed = merge(self._landed)
            self._changed.notify_all()

    def finish(self, ok: bool, epoch: int = 0) -> None:
        with self._lock:
            if self.state == "Pulling":
                self.state, self.epoch = ("Done", epoch) if ok else ("Failed", 0)
            self._changed.notify_all()

    def wait_beyond(self, after_bytes: int, timeout: float) -> None:
        """Block until more than `after_bytes` landed, the pull ended, or `timeout`."""
        with self._lock:
            self._changed.wait_for(
                lambda: self.bytes_done > after_bytes or self.state != "Pulling", timeout
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._landed = merge(self._landed)
            return {
                "pull_id": self.pull_id,
                "version": self.version,
                "state": self.state,
                "epoch": self.epoch,
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "completed": list(self._landed),
            }


# -- downstream side -------------------------------------------------------------------
@dataclass
class _Link:
    """What a downstream link follows: the upstream, our prepared READs from it, and
    for each READ handle the plan segments (source ranges) it carries."""

    src: Any  # agent._Source
    entry: Any  # nixl_engine.Prepared
    need: list[list[Segment]]
    plan: Any  # planner.Plan
    pull_id: str
    version: str


def _serves(client: Any, want: str | None) -> bool:
    v = client.version()
    return bool(v.version) and int(v.epoch) % 2 == 0 and (want is None or v.version == want)


def run_relay(agent: Agent, endpoint: str, opts: PullOptions) -> PullResult:
    """Pull from `endpoint` while it pulls the same version (a plain pull once it serves it)."""
    from .agent import _Source
    from .pull import adopt_layout, run_pull

    t_start = time.perf_counter()
    stats0 = agent.engine.stats.as_dict()
    client = agent._peer(endpoint)
    try:
        while True:  # wait for the upstream to declare its layout and start the pull
            opts.check_cancel()
            st = client.relay_status()
            if st.state != "Pulling" and _serves(client, opts.want):
                return run_pull(agent, [endpoint], opts)
            if st.state == "Pulling" and st.fingerprint and opts.want in (None, st.version):
                break
            opts.check_deadline(f"upstream {endpoint} was not pulling {opts.want or 'a version'}")
            time.sleep(RELAY_POLL_S)
        try:
            man = client.manifest()
        except PeerUnavailable as exc:
            if exc.fields.get("code") == "FAILED_PRECONDITION":
                raise NotDeclared(
                    f"upstream {endpoint} lost its layout", endpoint=endpoint
                ) from exc
            raise
        if (man.fingerprint, man.generation) != (st.fingerprint, int(st.generation)):
            raise RelayBroken(f"upstream {endpoint} re-declared its layout", endpoint=endpoint)
        cached = agent._peers.get(endpoint)
        if cached is not None and cached.manifest.cache_key != man.cache_key:
            agent.engine.drop(endpoint)
        src = _Source(endpoint, client, man, st.version, int(man.epoch))
        agent._peers[endpoint] = src
        register_s = adopt_layout(agent, man.tensors) if agent._layout is None else 0.0
        plan = agent._plan([src], opts.chunk_bytes)  # LayoutMismatch: nothing written yet
        prepared, members = agent._prepare([src], plan, agent.slabs)
        entry = prepared[0]
        need = [members[(entry.peer, i)] for i in range(len(entry.handles))]
        link = _Link(src, entry, need, plan, st.pull_id, st.version)
        return _follow(agent, link, opts, register_s, t_start, stats0)
    except PeerUnavailable:
        agent._peers.pop(endpoint, None)
        raise


def _landed(tracker: PullTracker, groups: list[list[Segment]], _entry: Any, j: int) -> None:
    tracker.landed(groups[j])


def _ready(link: _Link, todo: set[int], status: Any) -> list[int]:
    have = merge((int(r.slab), int(r.offset), int(r.nbytes)) for r in status.completed)
    return sorted(
        i
        for i in todo
        if all(covered(have, g.src_slab, g.src_offset, g.nbytes) for g in link.need[i])
    )


def _follow(
    agent: Agent,
    link: _Link,
    opts: PullOptions,
    register_s: float,
    t_start: float,
    stats0: dict[str, int],
) -> PullResult:
    from .nixl_engine import Prepared, ReadResult
    from .pull import CHECK_INTERVAL_S, Watch, finish_result

    src, entry, version = link.src, link.entry, link.version
    tracker = PullTracker(version, link.plan.moved_bytes, {})
    refit_id = None
    if opts.quiesce:
        refit_id = agent.link.pause(version, opts.quiesce_timeout_s, opts.cancel)
    ok = False
    try:
        agent.begin_write()
        agent._track(tracker)  # the next link may follow us in turn
        watch = Watch(opts, tracker)
        todo = set(range(len(link.need)))
        seconds, rounds = 0.0, 0
        seen = -1  # upstream bytes already looked at: the next ask waits for more
        while True:
            opts.check_cancel()
            opts.check_deadline(f"relay from {src.endpoint}: {len(todo)} READ groups left")
            st = src.client.relay_status(after_bytes=seen, wait_s=RELAY_WAIT_S if seen >= 0 else 0)
            seen = -1
            if st.pull_id != link.pull_id or st.state == "Failed":
                raise RelayBroken(
                    f"upstream {src.endpoint} abandoned the pull we followed ({st.state})",
                    endpoint=src.endpoint,
                )
            ready = _ready(link, todo, st)
            if not ready:
                if not todo and st.state == "Done":
                    break
                watch()
                seen = int(st.bytes_done)
                continue
            sub = Prepared(
                entry.key,
                entry.peer,
                [entry.handles[i] for i in ready],
                [entry.handle_bytes[i] for i in ready],
                [],
                sum(len(link.need[i]) for i in ready),
            )
            res = agent.engine.read(
                [sub],
                deadline=opts.deadline,
                check=watch,
                check_interval_s=CHECK_INTERVAL_S,
                max_inflight=agent.config.max_inflight,
                max_bytes_per_s=opts.max_gbps * 1e9 if opts.max_gbps else None,
                on_complete=functools.partial(_landed, tracker, [link.need[i] for i in ready]),
            )
            seconds += res.seconds
            rounds += 1
            todo.difference_update(ready)
        info = src.client.version()
        if (info.version, int(info.epoch)) != (version, int(st.epoch)):
            raise VersionChanged(
                f"upstream {src.endpoint} finished {version!r} but now serves {info.version!r}",
                endpoint=src.endpoint,
                had=version,
                now=info.version,
            )
        if opts.progress is not None:
            opts.progress(link.plan.moved_bytes)
        agent.publish(version)
        ok = True
        tracker.finish(ok=True, epoch=agent.version_info()["epoch"])
        moved = {src.endpoint: link.plan.moved_bytes}
        res = ReadResult(link.plan.bytes, seconds, link.plan.descriptors, len(link.need), moved)
        out = finish_result(agent, link.plan, res, 1, [src.endpoint], register_s, t_start, stats0)
        out.stats["relay_rounds"] = rounds
        return out
    finally:
        if not ok:
            tracker.finish(ok=False)
            agent._mark_failed_pull()
        agent.link.resume(refit_id, version, ok)

"""The relay pull: a chain link READs from an upstream target while that target still pulls.

Upstream side: the pull cycle tracks which byte ranges of our slabs have landed for
the pull in progress (progress.PullTracker, one id per attempt); the RelayStatus RPC
serves it. Downstream side (RelayPull): adopt the upstream's layout as soon as it is
declared, then repeatedly ask RelayStatus — a long poll, answered as soon as more
bytes landed — and READ only the descriptor groups whose source bytes lie inside
completed ranges; at the end require that the upstream finished that same pull and
now serves the version at the epoch it published, else RelayBroken / VersionChanged:
the operator re-links the target.

An upstream that already serves the version when the link starts is pulled from
directly (`start` returns None).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cycle import Attempt, Parts, PullContext, Watch
from .errors import NotDeclared, PeerUnavailable, RelayBroken, VersionChanged
from .planner import Segment
from .progress import ByteRange, PullTracker, covered, merge
from .pull import adopt_layout
from .transport import Prepared, ReadResult
from .version import is_writing

if TYPE_CHECKING:
    from .peers import Source
    from .planner import Plan

# How often a link asks its upstream whether it started pulling (once per link).
RELAY_POLL_S = 0.01
# While following, each RelayStatus is a long poll: the upstream answers as soon as
# more bytes landed (or the pull ended), so a link learns of a chunk one call after
# it lands instead of half a poll period later. The wait is bounded so the link
# still looks at cancellation, progress and its deadline this often.
RELAY_WAIT_S = 0.05


@dataclass
class _Upstream:
    """What a downstream link follows: the upstream, our prepared READs from it, and
    for each READ handle the plan segments (source ranges) it carries."""

    src: Source
    entry: Prepared
    need: list[list[Segment]]
    plan: Plan
    pull_id: str
    rounds: int = 0  # READ rounds it took (one per batch of groups found landed)


def _serves(client: Any, rank: int, want: str | None) -> bool:
    v = client.version(rank=rank)
    return bool(v.version) and not is_writing(int(v.epoch)) and want in (None, v.version)


def _landed(tracker: PullTracker, groups: list[list[Segment]], _entry: Any, j: int) -> None:
    tracker.landed(groups[j])


class RelayPull:
    double_buffer = False
    digests_early = False

    def __init__(self, parts: Parts, endpoint: str) -> None:
        self.parts = parts
        self.endpoint = endpoint
        self._status: Any = None  # the upstream's RelayStatus once it pulls

    def retries(self) -> int:
        return 0  # a changed upstream is re-linked by the operator

    def sources(self) -> list[str]:
        return [self.endpoint]

    def digest_source(self, attempt: Attempt) -> Source:
        """The upstream: it published the version (verified, with its source's digests)."""
        return attempt.state.src

    def details(self, attempt: Attempt) -> dict[str, Any]:
        return {"relay_rounds": attempt.state.rounds}

    def start(self, ctx: PullContext) -> bool:
        """Wait until the upstream pulls the version we want (True) or already serves it
        (False: pull from it directly)."""
        client, rank = self.parts.peers.client(self.endpoint)
        try:
            while True:
                ctx.check_cancel()
                st = client.relay_status(rank=rank)
                if st.state != "Pulling" and _serves(client, rank, ctx.request.version):
                    return False
                if (
                    st.state == "Pulling"
                    and st.fingerprint
                    and ctx.request.version
                    in (
                        None,
                        st.version,
                    )
                ):
                    self._status = st
                    return True
                ctx.check_deadline(
                    f"upstream {self.endpoint} was not pulling {ctx.request.version or 'a version'}"
                )
                time.sleep(RELAY_POLL_S)
        except PeerUnavailable:
            self.parts.peers.forget(self.endpoint)
            raise

    def prepare(self, ctx: PullContext) -> Attempt:
        parts, st = self.parts, self._status
        client, rank = parts.peers.client(self.endpoint)
        try:
            man = client.manifest(rank=rank)
        except PeerUnavailable as exc:
            parts.peers.forget(self.endpoint)
            if exc.fields.get("code") == "FAILED_PRECONDITION":
                raise NotDeclared(
                    f"upstream {self.endpoint} lost its layout", endpoint=self.endpoint
                ) from exc
            raise
        if (man.fingerprint, man.generation) != (st.fingerprint, int(st.generation)):
            raise RelayBroken(
                f"upstream {self.endpoint} re-declared its layout", endpoint=self.endpoint
            )
        src = parts.peers.adopt(self.endpoint, man, st.version)
        if not parts.store.declared:
            adopt_layout(parts, ctx, man.tensors)
        plan = parts.plans.plan([src], parts.store.layout, ctx.chunk_bytes)  # LayoutMismatch
        reads = parts.plans.prepare(
            [src], plan, [s.info for s in parts.store.slabs], parts.store.generation
        )
        entry = reads.entries[0]
        need = [reads.members[(entry.peer, i)] for i in range(len(entry.handles))]
        up = _Upstream(src, entry, need, plan, st.pull_id)
        # The tracker learns of landed bytes from transfer() (handles are re-grouped there).
        return Attempt(st.version, plan.bytes, plan.moved_bytes, plan.descriptors, {}, up)

    def transfer(self, ctx: PullContext, attempt: Attempt, watch: Watch) -> ReadResult:
        up: _Upstream = attempt.state
        src, entry = up.src, up.entry
        todo = set(range(len(up.need)))
        seconds, rounds = 0.0, 0
        seen = -1  # upstream bytes already looked at: the next ask waits for more
        while True:
            ctx.check_cancel()
            ctx.check_deadline(f"relay from {src.endpoint}: {len(todo)} READ groups left")
            st = src.client.relay_status(
                after_bytes=seen, wait_s=RELAY_WAIT_S if seen >= 0 else 0, rank=src.rank
            )
            seen = -1
            if st.pull_id != up.pull_id or st.state == "Failed":
                raise RelayBroken(
                    f"upstream {src.endpoint} abandoned the pull we followed ({st.state})",
                    endpoint=src.endpoint,
                )
            ready = _ready(up, todo, st)
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
                sum(len(up.need[i]) for i in ready),
            )
            res = self.parts.transport.read(
                [sub],
                check=watch,
                max_inflight=self.parts.max_inflight,
                on_complete=functools.partial(_landed, watch.tracker, [up.need[i] for i in ready]),
                **ctx.read_limits(),
            )
            seconds += res.seconds
            rounds += 1
            todo.difference_update(ready)
        self._status = st  # Done: the epoch it published
        moved = {src.endpoint: up.plan.moved_bytes}
        up.rounds = rounds
        return ReadResult(up.plan.bytes, seconds, up.plan.descriptors, len(up.need), moved)

    def verify(self, ctx: PullContext, attempt: Attempt) -> None:
        up: _Upstream = attempt.state
        info = up.src.client.version(rank=up.src.rank)
        if (info.version, int(info.epoch)) != (attempt.version, int(self._status.epoch)):
            raise VersionChanged(
                f"upstream {up.src.endpoint} finished {attempt.version!r} but now serves "
                f"{info.version!r}",
                endpoint=up.src.endpoint,
                had=attempt.version,
                now=info.version,
            )

    def land(self, ctx: PullContext, attempt: Attempt) -> None:
        pass


def _ready(up: _Upstream, todo: set[int], status: Any) -> list[int]:
    have = merge(ByteRange(int(r.slab), int(r.offset), int(r.nbytes)) for r in status.completed)
    return sorted(
        i
        for i in todo
        if all(covered(have, g.src_slab, g.src_offset, g.nbytes) for g in up.need[i])
    )

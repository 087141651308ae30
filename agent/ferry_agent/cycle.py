"""The pull cycle: the one place that orders a target's writes into its slabs.

    prepare    sources, version, plan, prepared READs (a layout mismatch fails here:
               nothing has been written)
    quiesce    pause the engine and wait for its ack (single buffer: before the first
               write; double buffer: only around the swap)
    begin      odd epoch: peers and relays will not trust what they read meanwhile
    READs      NIXL READs into the active set, or into the standby set (double buffer)
    fence      every source still holds what we saw before the READs
    land       local work on what landed (a reshard places its scratch pieces)
    check      the landed bytes against the source's content digests for the version
               (request.verify: every piece, a sample, or none; digests.py); a mismatch
               fails the attempt with DigestMismatch before anything is served
    publish    even epoch and the version, with the digests it was checked against; or
               swap the standby set in under a new generation and publish
    resume     the engine, with the version its slabs hold now ("" for none) and whether
               the pull succeeded (and, after a swap, the generation to attach to)

A content mismatch is never retried here: the operator retries on another source. On
any failure after `begin` the slabs serve no version (they may hold a partial
pull) until the next success; the engine is resumed with version "" and ok=False
(never with the version that was attempted: its weights are torn); a relay tracker
is marked failed. A failed double-buffer pull leaves the active set, and the version
it holds, as they were. A source that changed version during the READs makes the attempt
start over (for "latest", up to the request's retries) or fails it with
VersionChanged: the cycle never publishes mixed versions.

The variants — direct (pull.py), relay (relay.py), reshard (transform/reshard_pull.py)
— supply only what differs: how they find and prepare their sources, how they READ,
how they fence, and what they do with the bytes before publishing.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import digests as digests_mod
from .errors import Cancelled, DigestsUnavailable, SourceStalled, TransferTimeout, VersionChanged
from .progress import PullTracker, RelayBoard

if TYPE_CHECKING:
    from .control import EngineHandshake
    from .digests import DigestBook, Digests
    from .fallback import FallbackWarnings
    from .ipc import CudaIpcCopier, Locality
    from .metrics import AgentMetrics
    from .peers import PeerCache, Source
    from .planner import Segment
    from .plans import PlanCache
    from .request import PullRequest
    from .store import SlabStore
    from .transport import NixlTransport, ReadResult
    from .version import VersionState

# How often a source's version is polled while READs are in flight; cancellation
# and progress are looked at on the same tick.
CHECK_INTERVAL_S = 0.05
# How long to wait between looks at a source that is mid-write.
WRITING_BACKOFF_S = 0.01


@dataclass
class Parts:
    """The agent's components a pull works on (handed over, so that no variant imports
    the Agent)."""

    store: SlabStore
    versions: VersionState
    peers: PeerCache
    plans: PlanCache
    transport: NixlTransport
    handshake: EngineHandshake
    metrics: AgentMetrics
    relays: RelayBoard
    chunk_bytes: int  # the agent's default
    max_inflight: int
    locality: Locality  # where our slabs are (host, GPU)
    digests: DigestBook  # the content digests of the version we serve
    ipc: CudaIpcCopier | None = None  # CUDA agents: same-GPU sources are copied through IPC
    fallback: FallbackWarnings | None = None  # says why a NIXL pull would run over TCP


@dataclass
class PullResult:
    version: str
    bytes: int
    seconds: float  # the READs
    descriptors: int
    attempts: int
    sources: list[str]
    register_s: float = 0.0  # registering slabs this pull declared (a fresh target)
    total_s: float = 0.0  # the whole cycle: sources, plan, prepare, READs, fence, publish
    source_bytes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)  # transport counters (see TransportStats)
    phases_s: dict[str, float] = field(default_factory=dict)  # see Phases
    details: dict[str, Any] = field(default_factory=dict)  # what the variant adds (reshard)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class PullContext:
    """One pull's request and its call context: deadline, cancellation, progress."""

    def __init__(
        self,
        request: PullRequest,
        parts: Parts,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.request = request
        self.deadline = time.monotonic() + request.timeout_s
        self.chunk_bytes = request.chunk_bytes or parts.chunk_bytes
        self.cancel = cancel
        self.progress = progress
        self.phases = Phases()
        self.register_s = 0.0

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the pull was cancelled")

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise TransferTimeout(f"{what} at the deadline")

    def read_limits(self) -> dict[str, Any]:
        """NixlTransport.read's keyword arguments every variant passes alike."""
        r = self.request
        return {
            "deadline": self.deadline,
            "check_interval_s": CHECK_INTERVAL_S,
            "max_bytes_per_s": r.max_gbps * 1e9 if r.max_gbps else None,
        }


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


class Watch:
    """Runs on the pulling thread every CHECK_INTERVAL_S while READs are in flight:
    cancellation first, then progress (bytes landed so far), then the variant's fence.

    `stall_s` (set by variants that READ from serving sources): a pull that lands no
    bytes for that long fails as SourceStalled. A frozen source can still pass the fence
    (a same-host header is a file it shares, readable while it hangs), and its READs
    would otherwise wait out the whole deadline."""

    def __init__(
        self, ctx: PullContext, tracker: PullTracker, fence: Callable[[], None] | None = None
    ) -> None:
        self.ctx, self.tracker, self.fence = ctx, tracker, fence
        self.reported = -1
        self.stall_s: float | None = None
        self._moved = (-1, time.monotonic())  # bytes landed, when that count was first seen

    def __call__(self) -> None:
        self.ctx.check_cancel()
        done = self.tracker.bytes_done
        if self.ctx.progress is not None and done != self.reported:
            self.reported = done
            self.ctx.progress(done)
        self._check_stall(done)
        if self.fence is not None:
            self.fence()

    def _check_stall(self, done: int) -> None:
        now = time.monotonic()
        if done != self._moved[0]:
            self._moved = (done, now)
        elif self.stall_s is not None and now - self._moved[1] > self.stall_s:
            raise SourceStalled(
                f"no bytes landed for {self.stall_s:.1f}s ({done} of "
                f"{self.tracker.bytes_total} bytes in); the source hangs",
                bytes=done,
            )


@dataclass
class Attempt:
    """What a variant prepared for one attempt, before anything is written."""

    version: str  # what lands if the attempt succeeds
    bytes: int  # tensor bytes
    moved_bytes: int  # bytes the READs move (padding inside coalesced runs included)
    descriptors: int
    members: dict[tuple[str, int], list[Segment]]  # landed segments per READ handle
    state: Any = None  # the variant's own (sources, prepared READs, ...)


class PullVariant(Protocol):
    double_buffer: bool
    digests_early: bool  # the digest source serves the version before our READs

    def retries(self) -> int:
        """How many times a VersionChanged attempt may start over."""

    def prepare(self, ctx: PullContext) -> Attempt: ...

    def transfer(self, ctx: PullContext, attempt: Attempt, watch: Watch) -> ReadResult: ...

    def verify(self, ctx: PullContext, attempt: Attempt) -> None:
        """The fence after the READs: raise VersionChanged if a source moved."""

    def land(self, ctx: PullContext, attempt: Attempt) -> None:
        """Local work on the landed bytes before they are published."""

    def sources(self) -> list[str]: ...

    def digest_source(self, attempt: Attempt) -> Source | None:
        """The peer whose content digests the landed bytes must match; None when they are
        this agent's own (a reshard builds a shard no source holds: its digests are
        computed here at publish)."""

    def details(self, attempt: Attempt) -> dict[str, Any]: ...


def run(parts: Parts, variant: PullVariant, ctx: PullContext) -> PullResult:
    """One pull, start to end, in the order the module doc gives."""
    t_start = time.perf_counter()
    stats0 = parts.transport.stats.as_dict()
    refit: int | None = None  # the engine's refit handshake, once paused
    version = ctx.request.version or ""
    writing = ok = swapped = False
    tracker: PullTracker | None = None
    try:
        for number in itertools.count(1):
            ctx.phases.start()
            attempt = variant.prepare(ctx)
            version = attempt.version
            tracker = PullTracker(version, attempt.moved_bytes, attempt.members)
            expected = ask_digests(variant, attempt, ctx)  # answered while the READs run
            ctx.phases.mark("plan")
            if not variant.double_buffer:
                if ctx.request.quiesce and refit is None:
                    refit = parts.handshake.pause(
                        version, ctx.request.quiesce_timeout_s, ctx.cancel, parts.versions.version
                    )
                parts.versions.begin_write()
                writing = True
                parts.relays.track(tracker)  # downstream relays may follow this pull
            ctx.check_cancel()
            ctx.phases.mark("begin")
            try:
                res = variant.transfer(ctx, attempt, Watch(ctx, tracker))
                ctx.phases.mark("read")
                variant.verify(ctx, attempt)
                ctx.phases.mark("fence")
            except VersionChanged:
                tracker.finish(ok=False)
                if writing:
                    parts.versions.clear()
                    writing = False
                if number <= variant.retries():
                    continue
                raise
            variant.land(ctx, attempt)
            record, checked = check_content(parts, variant, ctx, attempt, expected)
            ctx.phases.mark("verify")
            if ctx.progress is not None:
                ctx.progress(attempt.moved_bytes)
            if variant.double_buffer:
                if ctx.request.quiesce:
                    refit = parts.handshake.pause(
                        version, ctx.request.quiesce_timeout_s, ctx.cancel, parts.versions.version
                    )
                ctx.check_cancel()
                with parts.store.lock:
                    parts.store.swap()
                    parts.digests.adopt(record)
                    parts.versions.publish(version)
                swapped = True
            else:
                with parts.store.lock:
                    parts.digests.adopt(record)
                    parts.versions.publish(version)
            writing, ok = False, True
            tracker.finish(ok=True, epoch=parts.versions.epoch)
            ctx.phases.mark("publish")
            out = _result(parts, variant, ctx, attempt, res, number, t_start, stats0)
            out.details["verified_pieces"] = checked
            out.details["digest"] = record.total if isinstance(record, digests_mod.Digests) else ""
            return out
        raise AssertionError("unreachable")
    finally:
        if tracker is not None and not ok:
            tracker.finish(ok=False)
        if writing:
            parts.versions.clear()
        generation = parts.store.generation if swapped else None
        # What the slabs hold now, not what was attempted: "" after a failed write.
        parts.handshake.resume(refit, parts.versions.version, ok, generation)


def ask_digests(
    variant: PullVariant, attempt: Attempt, ctx: PullContext
) -> Callable[[], Digests] | None:
    """The source's digests of the version, asked for before the READs when the source
    already serves it (a relay's upstream does only once it finished: asked after) and
    the pull checks them (`off`: asked only when someone asks us, see check_content)."""
    src = variant.digest_source(attempt)
    if src is None or not variant.digests_early or verify_mode(ctx) == "off":
        return None
    return src.client.digests_later(attempt.version, rank=src.rank)


def verify_mode(ctx: PullContext) -> str:
    return ctx.request.verify or digests_mod.DEFAULT_MODE


def check_content(
    parts: Parts,
    variant: PullVariant,
    ctx: PullContext,
    attempt: Attempt,
    asked: Callable[[], Digests] | None = None,
) -> tuple[Digests | digests_mod.Deferred | None, int]:
    """The digests to serve the version with, and how many pieces were checked: the
    source's, checked against the landed bytes (in the standby set for a double-buffer
    pull); our own, computed now, when no source's apply (a reshard); with `off`, the
    source's, fetched only when someone asks this agent for them (Deferred); None when
    the source served none and the request does not check."""
    slabs = parts.store.standby() if variant.double_buffer else parts.store.slabs
    layout = parts.store.layout
    src = variant.digest_source(attempt)
    if src is None:
        return digests_mod.of_version(
            attempt.version, slabs, layout.placements, parts.store.memory
        ), 0
    mode = verify_mode(ctx)
    if mode == "off":  # nothing checked: hand on the source's digests, fetched when asked
        return digests_mod.Deferred(
            attempt.version, functools.partial(src.client.digests, attempt.version, rank=src.rank)
        ), 0
    try:
        expected = asked() if asked else src.client.digests(attempt.version, rank=src.rank)
    except DigestsUnavailable:
        if mode == "off":
            return None, 0
        raise
    todo = digests_mod.select(
        digests_mod.pieces(layout.placements, expected.piece_bytes),
        mode,
        seed=f"{parts.digests.seed}/{layout.fingerprint}",
        round=parts.digests.next_round() if mode == "sampled" else 0,
    )
    if todo:
        got = digests_mod.compute(
            slabs, layout.placements, expected.algorithm, todo, expected.piece_bytes
        )
        digests_mod.check(expected, got, source=src.endpoint)
    return expected, len(todo)


def _result(
    parts: Parts,
    variant: PullVariant,
    ctx: PullContext,
    attempt: Attempt,
    res: ReadResult,
    attempts: int,
    t_start: float,
    stats0: dict[str, int],
) -> PullResult:
    stats1 = parts.transport.stats.as_dict()
    m = parts.metrics
    m.bytes_moved.labels("in").inc(attempt.bytes)
    m.transfer_seconds.observe(res.seconds)
    m.transfer_gbps.set(attempt.bytes / res.seconds / 1e9 if res.seconds else 0)
    m.descriptors.set(attempt.descriptors)
    if stats1["dlists_reused"] > stats0["dlists_reused"]:
        m.dlists_reused.inc()
    return PullResult(
        version=parts.versions.version,
        bytes=attempt.bytes,
        seconds=res.seconds,
        descriptors=attempt.descriptors,
        attempts=attempts,
        sources=variant.sources(),
        register_s=ctx.register_s,
        total_s=time.perf_counter() - t_start,
        source_bytes=dict(res.per_peer_bytes),
        phases_s=ctx.phases.mark("finish"),
        stats={k: stats1[k] - stats0[k] for k in stats1}
        | {"total_" + k: v for k, v in stats1.items()},
        details=variant.details(attempt),
    )

"""The target side of continuous refit: one local rank following a source (Follower).

A stream thread holds the Follow call open and keeps only the newest notice; a
pull thread pulls that version (receiver-driven, cycle.py: from the source, or as a
relay link from its upstream target) and Reports the outcome to the source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import BadRequest, FerryError, PeerUnavailable, RelayBroken, VersionChanged
from ..request import PullRequest, SourceAddress
from .records import Notice, Outcome

log = logging.getLogger(__name__)

# Pulls of one version again after its source's epoch moved with no newer version.
VERSION_RETRIES = 2
# A follower whose stream broke tries again after this long, doubling up to the max.
RECONNECT_S, RECONNECT_MAX_S = 0.1, 5.0


@dataclass(frozen=True)
class FollowSpec:
    """What one local rank of a target follows, and how it pulls each version.

    `source`: host:port[/rank] of the source agent whose versions it follows (and
    reports to). `upstream`: another target to pull from as a relay link (chain or
    tree); None pulls from the source. `name`: the follower's name on the source's
    board (default: the pod, with "/r" for local rank r > 0)."""

    source: str
    upstream: str | None = None
    rank: int = 0
    name: str = ""
    timeout_s: float = 60.0
    stall_timeout_s: float = 20.0
    chunk_bytes: int | None = None
    max_gbps: float | None = None
    quiesce: bool = False
    double_buffer: bool = False
    # A relay link that breaks (its upstream left or failed) pulls from the source.
    fallback_to_source: bool = True

    def __post_init__(self) -> None:
        SourceAddress.parse(self.source)
        if self.upstream is not None:
            SourceAddress.parse(self.upstream)
            if self.double_buffer:
                raise BadRequest(
                    "follow: a relay link (upstream) pulls without double buffer",
                    field="double_buffer",
                )

    def request(self, version: str, *, direct: bool = False) -> PullRequest:
        """The pull of `version`: as a relay link of the upstream, or direct."""
        relay = self.upstream is not None and not direct
        return PullRequest(
            sources=(self.upstream if relay else self.source,),  # type: ignore[arg-type]
            version=version,
            timeout_s=self.timeout_s,
            stall_timeout_s=self.stall_timeout_s,
            chunk_bytes=self.chunk_bytes,
            max_gbps=self.max_gbps,
            retries=0,
            quiesce=self.quiesce,
            relay=relay,
            double_buffer=self.double_buffer,
            rank=self.rank,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FollowSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        return cls(**known)


@dataclass
class FollowState:
    """What a Follower did last (read by the status report and tests)."""

    serving: str = ""
    pulls: int = 0
    failures: int = 0
    last: Outcome | None = None
    connected: bool = False
    history: list[str] = field(default_factory=list)  # versions served, in order (last 64)


class Follower:
    """A target rank following one source: a stream thread keeps the newest notice,
    a pull thread pulls it and reports back. `pull(request, cancel)` is the agent's
    pull; `client` an AgentClient of the source, closed by stop()."""

    def __init__(
        self,
        spec: FollowSpec,
        pull: Callable[[PullRequest, threading.Event], Any],
        client: Any,
        serving: Callable[[], str],
        on_outcome: Callable[[Outcome], None] | None = None,
        state: FollowState | None = None,
    ) -> None:
        """`state`: carried over from the Follower this one replaces (re-linked to
        another upstream), so its record of versions served goes on."""
        self.spec = spec
        self._pull, self.client, self._serving = pull, client, serving
        self._on_outcome = on_outcome
        self.state = state or FollowState()
        self.state.serving = serving()
        self._stop = threading.Event()
        self._cancel = threading.Event()  # cancels the pull in flight (stop)
        self._wake = threading.Condition()
        self._pending: tuple[Notice, float] | None = None  # newest notice, when it came
        self._call: Any = None
        self._threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> Follower:
        for target, what in ((self._stream_loop, "stream"), (self._pull_loop, "pull")):
            t = threading.Thread(target=target, name=f"ferry-follow-{what}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cancel.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)
        self.client.close()

    # -- notices --
    def _stream_loop(self) -> None:
        backoff = RECONNECT_S
        while not self._stop.is_set():
            try:
                self._call = self.client.follow(
                    self.spec.name,
                    serving=self._serving(),
                    rank=SourceAddress.parse(self.spec.source).rank,
                )
                self.state.connected = True
                backoff = RECONNECT_S
                for notice in self._call:
                    self._offer(notice)
            except FerryError as exc:
                if not self._stop.is_set():
                    log.info("follow stream to %s ended: %s", self.spec.source, exc.message)
            finally:
                self.state.connected = False
                self._call = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _offer(self, notice: Notice) -> None:
        with self._wake:
            self._pending = (notice, time.perf_counter())
            self._wake.notify_all()

    def _take(self) -> tuple[Notice, float] | None:
        with self._wake:
            while self._pending is None and not self._stop.is_set():
                self._wake.wait(1.0)
            got, self._pending = self._pending, None
            return got

    # -- pulls --
    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            got = self._take()
            if got is None:
                continue
            notice, t0 = got
            if notice.version == self._serving():
                outcome = Outcome(self.name, notice.version, notice.version, True)
            else:
                outcome = self._pull_version(notice.version, t0)
            if self._stop.is_set():
                return
            with self._wake:
                superseded = not outcome.ok and self._pending is not None
            if superseded:  # the source moved on mid-pull: the newer version is next
                log.debug(
                    "follower %s: %s superseded (%s)", self.name, outcome.wanted, outcome.reason
                )
                continue
            self._record(outcome)
            self._report(outcome)

    def _pull_version(self, version: str, t0: float) -> Outcome:
        spec = self.spec
        via_upstream = spec.upstream is not None
        try:
            try:
                r = self._pull_retrying(spec.request(version))
            except (RelayBroken, PeerUnavailable) as exc:
                if not via_upstream or not spec.fallback_to_source or self._stop.is_set():
                    raise
                log.info(
                    "relay from %s failed (%s): pulling %s from the source",
                    spec.upstream,
                    exc.reason,
                    version,
                )
                via_upstream = False
                r = self._pull_retrying(spec.request(version, direct=True))
        except FerryError as exc:
            return Outcome(
                self.name,
                version,
                self._serving(),
                False,
                exc.reason,
                exc.message,
                time.perf_counter() - t0,
            )
        # "relay": the bytes came from the upstream target (chunk by chunk while it
        # pulled, or from what it already served), not from the source
        transport = "relay" if via_upstream else str(r.details.get("transport", "nixl"))
        return Outcome(
            self.name,
            version,
            r.version,
            True,
            seconds=time.perf_counter() - t0,
            bytes=int(r.bytes),
            transport=transport,
        )

    def _pull_retrying(self, request: PullRequest) -> Any:
        """The pull, again (up to VERSION_RETRIES times) when the source's epoch moved
        under it but no newer version was announced: a re-publish of the same version
        (the source serves it again at a new epoch) is not a failure to report."""
        for attempt in range(VERSION_RETRIES + 1):
            try:
                return self._pull(request, self._cancel)
            except VersionChanged:
                with self._wake:
                    newer = self._pending is not None
                if newer or attempt == VERSION_RETRIES or self._stop.is_set():
                    raise
        raise AssertionError("unreachable")

    def _record(self, outcome: Outcome) -> None:
        st = self.state
        st.last = outcome
        if outcome.ok:
            st.pulls += 1
            if outcome.version != st.serving:
                st.history = [*st.history[-63:], outcome.version]
            st.serving = outcome.version
        else:
            st.failures += 1
            log.warning(
                "follower %s: %s not served: %s: %s",
                self.name,
                outcome.wanted,
                outcome.reason,
                outcome.message,
            )
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _report(self, outcome: Outcome) -> None:
        try:
            self.client.report(outcome, rank=SourceAddress.parse(self.spec.source).rank)
        except FerryError as exc:  # the source is away; its board forgets us anyway
            log.info("report to %s failed: %s", self.spec.source, exc.message)


def follower_name(pod: str, rank: int = 0) -> str:
    """A follower's default name on its source's board: the pod, "/r" for local rank r > 0."""
    return pod if rank == 0 else f"{pod}/{rank}"


def with_name(spec: FollowSpec, pod: str) -> FollowSpec:
    return spec if spec.name else replace(spec, name=follower_name(pod, spec.rank))

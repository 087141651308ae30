"""The source side of continuous refit: a source rank's followers (FollowerBoard).

Each Follow stream is one Subscription that is sent the newest notice it was not
sent yet (notices coalesce); followers' Reports land on the board, and
`publish_and_wait` waits on it. Each Follow stream holds one gRPC server thread on
the source for its lifetime, so a source agent takes at most MAX_FOLLOWERS
subscriptions (a tree's deeper levels still subscribe to the source: notices are
small; the bytes come from their upstreams).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from ..errors import BadRequest
from .records import Notice, Outcome, missing

# Follow streams one source agent serves at once (each holds a server thread).
MAX_FOLLOWERS = 128
# A Follow stream wakes this often without a notice to see whether its caller left.
STREAM_IDLE_S = 1.0


class Subscription:
    """One follower's Follow stream: the newest notice it has not been sent yet."""

    def __init__(self, board: FollowerBoard, follower: str, serving: str):
        self.board, self.follower, self.serving = board, follower, serving
        self.sent = serving  # the last version this follower was told of (or serves)
        self.closed = False

    def next(self, timeout: float) -> Notice | None:
        """The newest notice this follower was not sent, waiting up to `timeout`."""
        return self.board._next(self, timeout)

    def close(self) -> None:
        self.board._unsubscribe(self)


class FollowerBoard:
    """A source rank's followers: their subscriptions, the notices, their reports.

    One lock and one condition: publish, subscribe, report and waiters all wake on it
    (a few followers per source; a notice is one small message per follower)."""

    def __init__(self, max_followers: int = MAX_FOLLOWERS) -> None:
        self.max_followers = max_followers
        self._cond = threading.Condition()
        self._latest: Notice | None = None
        self._subs: dict[str, Subscription] = {}
        self._reports: dict[str, Outcome] = {}  # follower -> its newest report

    # -- what the RankAgent calls --
    def notify(self, notice: Notice) -> None:
        """A version was published: every subscription gets it on its next wake-up."""
        with self._cond:
            self._latest = notice
            self._cond.notify_all()

    @property
    def latest(self) -> Notice | None:
        return self._latest

    # -- the Follow RPC --
    def subscribe(self, follower: str, serving: str = "") -> Subscription:
        """A follower's stream; a second stream of the same follower replaces the first
        (a target that reconnects before the old call noticed it was gone)."""
        if not follower:
            raise BadRequest("follow: the follower must name itself", field="follower")
        with self._cond:
            old = self._subs.get(follower)
            if old is None and len(self._subs) >= self.max_followers:
                raise BadRequest(
                    f"follow: this source serves at most {self.max_followers} followers; "
                    "use a chain or tree strategy or more source replicas",
                    field="follower",
                    limit=self.max_followers,
                )
            if old is not None:
                old.closed = True
            sub = self._subs[follower] = Subscription(self, follower, serving)
            if serving and follower not in self._reports:
                self._reports[follower] = Outcome(follower, serving, serving, True, at=time.time())
            self._cond.notify_all()
            return sub

    def _next(self, sub: Subscription, timeout: float) -> Notice | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if sub.closed:
                    return None
                latest = self._latest
                if latest is not None and latest.version != sub.sent:
                    sub.sent = latest.version
                    return latest
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._cond:
            sub.closed = True
            if self._subs.get(sub.follower) is sub:
                del self._subs[sub.follower]
                self._reports.pop(sub.follower, None)
            self._cond.notify_all()

    # -- the Report RPC --
    def report(self, outcome: Outcome) -> None:
        with self._cond:
            self._reports[outcome.follower] = outcome
            self._cond.notify_all()

    def followers(self) -> dict[str, Outcome | None]:
        """Every subscribed follower and its newest report (None: none yet)."""
        with self._cond:
            return {f: self._reports.get(f) for f in self._subs}

    # -- publish_and_wait --
    def wait(
        self,
        version: str,
        timeout_s: float,
        *,
        followers: tuple[str, ...] = (),
        at_least: int = 0,
    ) -> dict[str, Outcome]:
        """Each follower's outcome for `version` once all reported it (served or
        failed) or `timeout_s` passed.

        Whom to wait for: the names in `followers` (one not subscribed counts as
        missing), else every follower subscribed until the end, and at least
        `at_least` of them (a fleet still connecting). A follower that left is
        dropped from the wait; one that did not report in time is NotReported."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                names = followers or tuple(self._subs)
                done = {
                    f: r
                    for f in names
                    if (r := self._reports.get(f)) is not None
                    and (r.wanted == version or r.version == version)
                }
                enough = len(names) >= at_least
                left = deadline - time.monotonic()
                if (enough and len(done) == len(names)) or left <= 0:
                    return self._outcomes(version, names, done, at_least)
                self._cond.wait(left)

    def _outcomes(
        self, version: str, names: tuple[str, ...], done: dict[str, Outcome], at_least: int
    ) -> dict[str, Outcome]:
        out = dict(done)
        for f in names:
            if f in out:
                continue
            if f not in self._subs:
                out[f] = missing(
                    f, version, "NotFollowing", f"{f} is not subscribed to this source"
                )
            else:
                last = self._reports.get(f)
                serves = last.version if last else "nothing"
                out[f] = missing(
                    f,
                    version,
                    "NotReported",
                    f"{f} did not report {version} in time (serves {serves})",
                )
        for i in range(len(names), at_least):
            name = f"<missing-{i}>"
            out[name] = missing(
                name,
                version,
                "NotFollowing",
                f"only {len(names)} of {at_least} followers subscribed",
            )
        return out


def stream(sub: Subscription, active: Callable[[], bool]) -> Iterator[Notice]:
    """The Follow RPC's notices for `sub` until the caller leaves or is replaced."""
    try:
        while active() and not sub.closed:
            notice = sub.next(STREAM_IDLE_S)
            if notice is not None:
                yield notice
    finally:
        sub.close()

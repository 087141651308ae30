"""Progress of a pull: which byte ranges of the target's slabs hold the version yet.

A PullTracker is updated from NIXL's posting threads as each READ handle completes.
It feeds the pull's `progress(bytes)` callback, and a chain relay's upstream serves
it (RelayStatus) so that its downstream link READs only what has landed.
"""

from __future__ import annotations

import bisect
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .planner import Segment


class ByteRange(NamedTuple):
    slab: int
    offset: int
    nbytes: int


# -- ranges (pure) -----------------------------------------------------------------
def merge(ranges: Iterable[tuple[int, int, int]]) -> list[ByteRange]:
    """(slab, offset, nbytes) ranges sorted and merged where they touch or overlap."""
    out: list[ByteRange] = []
    for slab, off, n in sorted(r for r in ranges if r[2] > 0):
        last = out[-1] if out else None
        if last is not None and last.slab == slab and off <= last.offset + last.nbytes:
            end = max(last.offset + last.nbytes, off + n)
            out[-1] = ByteRange(slab, last.offset, end - last.offset)
        else:
            out.append(ByteRange(slab, off, n))
    return out


def covered(merged: Sequence[ByteRange], slab: int, off: int, n: int) -> bool:
    """Is [off, off+n) of `slab` inside one merged range?"""
    if n == 0:
        return True
    i = bisect.bisect_right(merged, (slab, off, 1 << 64)) - 1
    if i < 0:
        return False
    r = merged[i]
    return r.slab == slab and r.offset <= off and off + n <= r.offset + r.nbytes


@dataclass(frozen=True)
class RelayStatus:
    """A pull's progress as a downstream relay link sees it (the RelayStatus RPC)."""

    pull_id: str  # one per pull attempt; "" when this agent never pulled
    version: str
    state: str  # Idle | Pulling | Done | Failed
    epoch: int  # our published epoch once Done
    bytes_done: int
    bytes_total: int
    completed: tuple[ByteRange, ...]

    @classmethod
    def idle(cls) -> RelayStatus:
        return cls("", "", "Idle", 0, 0, 0, ())


class PullTracker:
    """Which of our slab ranges hold the version being pulled; updated from NIXL's
    posting threads as each READ handle completes (see NixlTransport.read on_complete)."""

    def __init__(self, version: str, total: int, members: dict[tuple[str, int], list[Segment]]):
        self.pull_id = secrets.token_hex(8)
        self.version = version
        self.bytes_total = total
        self.state = "Pulling"
        self.epoch = 0  # our published epoch once Done
        self._members = members
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._landed: list[ByteRange] = []
        self.bytes_done = 0

    def on_complete(self, entry: Any, i: int) -> None:
        self.landed(self._members.get((entry.peer, i), []))

    def landed(self, segs: Sequence[Segment]) -> None:
        with self._lock:
            self._landed.extend(ByteRange(g.dst_slab, g.dst_offset, g.nbytes) for g in segs)
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

    def snapshot(self) -> RelayStatus:
        with self._lock:
            self._landed = merge(self._landed)
            return RelayStatus(
                self.pull_id,
                self.version,
                self.state,
                self.epoch,
                self.bytes_done,
                self.bytes_total,
                tuple(self._landed),
            )


class RelayBoard:
    """The tracker of this agent's current (or last) single-buffer pull, which the
    RelayStatus RPC serves to downstream links."""

    def __init__(self) -> None:
        self._tracker: PullTracker | None = None

    def track(self, tracker: PullTracker) -> None:
        self._tracker = tracker

    def forget(self) -> None:
        self._tracker = None  # the slabs it described are gone

    def status(self, after_bytes: int = 0, wait_s: float = 0.0) -> RelayStatus:
        """With `wait_s`, first wait (up to 1 s) until more than `after_bytes` landed."""
        t = self._tracker
        if t is None:
            return RelayStatus.idle()
        if wait_s > 0:
            t.wait_beyond(after_bytes, min(wait_s, 1.0))
        return t.snapshot()

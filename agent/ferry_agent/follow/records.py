"""What travels between a source and its followers: a version notice and a follower's
report on it (both cross the agents' gRPC channel: VersionNotice, FollowReport)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Notice:
    """A published version, as a follower is told of it."""

    version: str
    epoch: int
    fingerprint: str = ""
    published_at: float = 0.0

    def to_proto(self, pb: Any) -> Any:
        return pb.VersionNotice(
            version=self.version,
            epoch=self.epoch,
            fingerprint=self.fingerprint,
            published_at=self.published_at,
        )

    @classmethod
    def from_proto(cls, m: Any) -> Notice:
        return cls(str(m.version), int(m.epoch), str(m.fingerprint), float(m.published_at))


@dataclass(frozen=True)
class Outcome:
    """What a follower reported about one version: served (ok) or why not."""

    follower: str
    wanted: str
    version: str  # served now
    ok: bool
    reason: str = ""
    message: str = ""
    seconds: float = 0.0
    bytes: int = 0
    transport: str = ""
    at: float = 0.0  # the source's clock when the report arrived

    def to_proto(self, pb: Any, rank: int = 0) -> Any:
        return pb.FollowReport(
            follower=self.follower,
            rank=rank,
            version=self.version,
            wanted=self.wanted,
            ok=self.ok,
            reason=self.reason,
            message=self.message,
            seconds=self.seconds,
            bytes=self.bytes,
            transport=self.transport,
        )

    @classmethod
    def from_proto(cls, m: Any) -> Outcome:
        return cls(
            follower=str(m.follower),
            wanted=str(m.wanted),
            version=str(m.version),
            ok=bool(m.ok),
            reason=str(m.reason),
            message=str(m.message),
            seconds=float(m.seconds),
            bytes=int(m.bytes),
            transport=str(m.transport),
            at=time.time(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "wanted": self.wanted,
            "ok": self.ok,
            "reason": self.reason,
            "message": self.message,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "transport": self.transport,
        }


def missing(follower: str, wanted: str, reason: str, message: str) -> Outcome:
    """The outcome of a follower that did not report `wanted` in time."""
    return Outcome(follower, wanted, "", False, reason, message)

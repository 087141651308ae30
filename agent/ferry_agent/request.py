"""A pull, as every caller asks for it: the one request type from the edge to the cycle.

The gRPC `Pull` RPC, the job runner (a RefitJob's spec) and in-process callers all
build a PullRequest; the agent's pull cycle reads nothing else. Its defaults are the
only ones. It is checked when built, so a bad request is refused (BadRequest) before
any source is asked anything; the bounds also keep a caller from asking for
unbounded work (a peer may call Pull).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from .digests import DEFAULT_MODE, MODES
from .errors import BadRequest
from .planner import CHUNK_ALIGN

MAX_SOURCES = 64  # striped sources of one pull; a reshard's source ranks
MAX_TIMEOUT_S = 86_400.0
MAX_CHUNK_BYTES = 1 << 40
MAX_RETRIES = 16
MAX_TP = 4096
MAX_BYTES = (1 << 63) - 1  # int64, as the CRDs' byte counts
MAX_FINGERPRINT = 128


class SourceAddress(NamedTuple):
    """A source: a pod's agent endpoint and one of its local ranks, written
    "host:port" (rank 0) or "host:port/r", optionally after the pod it must be
    ("pod@host:port/r"): in cluster mode (mTLS) a peer is dialled only under the pod
    name its certificate must carry, so an address without one is refused there."""

    endpoint: str
    rank: int = 0
    pod: str = ""

    @classmethod
    def parse(cls, text: str) -> SourceAddress:
        pod, at, rest = text.partition("@") if "@" in text else ("", "", text)
        endpoint, sep, rank = rest.rpartition("/") if "/" in rest else (rest, "", "0")
        bad_pod = at and not _POD.match(pod)
        if (
            bad_pod
            or not endpoint
            or ":" not in endpoint
            or not rank.isdigit()
            or int(rank) >= MAX_TP
        ):
            raise BadRequest(
                f"source {text!r} is not host:port or host:port/rank (optionally pod@host:port/rank)",
                source=text,
            )
        return cls(endpoint, int(rank), pod)

    def __str__(self) -> str:
        at = f"{self.pod}@" if self.pod else ""
        return f"{at}{self.endpoint}" if self.rank == 0 else f"{at}{self.endpoint}/{self.rank}"


# A pod name: a DNS subdomain.
_POD = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class Reshard:
    """Build this target's shard of a tensor-parallel layout: rank `rank` of `tp`
    (RefitJob spec.transform reshard); the sources are one replica per source rank,
    in rank order."""

    rank: int
    tp: int


@dataclass(frozen=True)
class PullRequest:
    sources: tuple[str, ...]  # host:port of source agents (or the one upstream of a relay)
    version: str | None = None  # None: whatever the sources hold ("latest")
    timeout_s: float = 60.0
    # A pull whose READs land nothing for this long fails as SourceStalled (the source
    # hangs); a retry can then go to another source well before timeout_s.
    stall_timeout_s: float = 20.0
    chunk_bytes: int | None = None  # None: the agent's --chunk-bytes
    max_gbps: float | None = None  # None: unlimited
    retries: int = 2  # re-pulls after the sources changed version (only without `version`)
    quiesce: bool = False  # pause the engine (and wait for its ack) around the writes
    quiesce_timeout_s: float = 30.0
    relay: bool = False  # the one source is a target still pulling: follow it chunk by chunk
    double_buffer: bool = False  # READ into the standby slab set, pause only for the swap
    reshard: Reshard | None = None
    rank: int = 0  # the local rank (GPU) of this agent that pulls
    # Bounds on the layout a fresh target adopts from its sources (the WeightSource's
    # status.bytes and status.fingerprint, for a job's pull); None: unbounded here (the
    # agent's --max-slab-bytes still holds).
    max_bytes: int | None = None
    fingerprint: str | None = None
    # content digests checked before the version is served (digests.py): full | sampled |
    # off; None: DEFAULT_MODE
    verify: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.verify:
            object.__setattr__(self, "verify", DEFAULT_MODE)
        if self.version in ("", "latest"):
            object.__setattr__(self, "version", None)
        problem = self._problem()
        if problem:
            raise BadRequest(f"pull request: {problem}", problem=problem)

    def _problem(self) -> str:
        n = len(self.sources)
        if not 1 <= n <= MAX_SOURCES or not all(isinstance(s, str) and s for s in self.sources):
            return f"sources: 1..{MAX_SOURCES} endpoints (host:port), got {n}"
        for src in self.sources:
            SourceAddress.parse(src)
        if not 0 <= self.rank < MAX_TP:
            return f"rank must be a local rank in 0..{MAX_TP - 1}, got {self.rank}"
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            return f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {self.timeout_s}"
        if not 0 < self.stall_timeout_s <= MAX_TIMEOUT_S:
            return f"stall_timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {self.stall_timeout_s}"
        if not 0 < self.quiesce_timeout_s <= MAX_TIMEOUT_S:
            return f"quiesce_timeout_s must be in (0, {MAX_TIMEOUT_S:g}]"
        if self.chunk_bytes is not None and not CHUNK_ALIGN <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            return (
                f"chunk_bytes must be in [{CHUNK_ALIGN}, {MAX_CHUNK_BYTES}], got {self.chunk_bytes}"
            )
        if self.max_gbps is not None and not self.max_gbps > 0:
            return f"max_gbps must be positive (or unset), got {self.max_gbps}"
        if not 0 <= self.retries <= MAX_RETRIES:
            return f"retries must be in 0..{MAX_RETRIES}, got {self.retries}"
        if self.max_bytes is not None and not 0 < self.max_bytes <= MAX_BYTES:
            return f"max_bytes must be in [1, {MAX_BYTES}] (or unset), got {self.max_bytes}"
        if self.fingerprint is not None and not 0 < len(self.fingerprint) <= MAX_FINGERPRINT:
            return f"fingerprint must be 1..{MAX_FINGERPRINT} characters (or unset)"
        if self.verify not in MODES:
            return f"verify must be one of {', '.join(MODES)}, got {self.verify!r}"
        if self.relay and (n != 1 or self.double_buffer):
            return "a relay pull follows exactly one upstream, without double buffer"
        if self.reshard is not None:
            r = self.reshard
            if not (1 <= r.tp <= MAX_TP and 0 <= r.rank < r.tp):
                return f"reshard rank {r.rank} of tp {r.tp} is not a rank in 0..tp-1"
            if self.relay or self.double_buffer:
                return (
                    "a reshard pulls straight from the source ranks into the active slabs: "
                    "no relay, no double buffer"
                )
        return ""

    @property
    def kind(self) -> str:
        """reshard | relay | direct: which pull variant runs it."""
        return "reshard" if self.reshard else "relay" if self.relay else "direct"

    # -- the control socket edge ----------------------------------------------------------
    FROM_DICT = (
        "sources",
        "version",
        "timeout_s",
        "stall_timeout_s",
        "chunk_bytes",
        "max_gbps",
        "retries",
        "quiesce",
        "quiesce_timeout_s",
        "relay",
        "double_buffer",
        "rank",
        "max_bytes",
        "fingerprint",
        "verify",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PullRequest:
        """A pull asked on the control socket (the local way to ask in cluster mode, where
        Pull is not served to peers): the same bounds as any request. Raises BadRequest."""
        if not isinstance(d, dict):
            raise BadRequest("pull request: a JSON object", problem="request")
        unknown = sorted(set(d) - set(cls.FROM_DICT))
        if unknown:
            raise BadRequest(
                f"pull request: unknown field(s) {', '.join(unknown)}; known: "
                f"{', '.join(cls.FROM_DICT)}",
                problem="fields",
            )
        try:
            return cls(**{**d, "sources": tuple(d.get("sources") or ())})
        except TypeError as exc:
            raise BadRequest(f"pull request: {exc}", problem="fields") from None

    # -- the gRPC edge --------------------------------------------------------------------
    def to_proto(self, pb: Any) -> Any:
        return pb.PullRequest(
            sources=list(self.sources),
            version=self.version or "",
            timeout_s=self.timeout_s,
            stall_timeout_s=self.stall_timeout_s,
            chunk_bytes=self.chunk_bytes or 0,
            max_gbps=self.max_gbps or 0.0,
            retries=self.retries,
            quiesce_engine=self.quiesce,
            quiesce_timeout_s=self.quiesce_timeout_s,
            relay=self.relay,
            double_buffer=self.double_buffer,
            reshard=pb.Reshard(rank=self.reshard.rank, tp=self.reshard.tp)
            if self.reshard
            else None,
            rank=self.rank,
            max_bytes=self.max_bytes or 0,
            fingerprint=self.fingerprint or "",
            verify=self.verify or "",
        )

    @classmethod
    def from_proto(cls, m: Any) -> PullRequest:
        """Proto3 zeros mean "unset": the defaults above apply. Raises BadRequest."""
        defaults = cls.__dataclass_fields__
        return cls(
            sources=tuple(m.sources),
            version=m.version or None,
            timeout_s=m.timeout_s or defaults["timeout_s"].default,
            stall_timeout_s=m.stall_timeout_s or defaults["stall_timeout_s"].default,
            chunk_bytes=int(m.chunk_bytes) or None,
            max_gbps=m.max_gbps or None,
            retries=int(m.retries),
            quiesce=m.quiesce_engine,
            quiesce_timeout_s=m.quiesce_timeout_s or defaults["quiesce_timeout_s"].default,
            relay=m.relay,
            double_buffer=m.double_buffer,
            reshard=Reshard(int(m.reshard.rank), int(m.reshard.tp))
            if m.HasField("reshard")
            else None,
            rank=int(m.rank),
            max_bytes=int(m.max_bytes) or None,
            fingerprint=m.fingerprint or None,
            verify=m.verify or None,
        )

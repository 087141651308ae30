"""An agent's Lease: its liveness, and the RefitJob channel between it and the operator.

Each agent renews `ferry-agent-<pod>` (labelled LEASE_LABEL). The same object
carries, as annotations keyed by the RefitJob's uid:

- `assign.ferry.dev/<uid>` (written by the operator), an `Assignment`: the attempt
  this pod must run now — job name, attempt number, upstream pods (and the
  endpoints of upstream targets the operator knows), version, start time and the
  job's spec. Present while an attempt is in hand; removed once the operator has
  folded its outcome, or when the job ends or is deleted (the agent cancels).
- `report.ferry.dev/<uid>` (written by the agent), a `Report`: its progress on
  that job — attempt, phase, bytes, seconds, reason, message, endpoint. Once no
  assignment for the job is left the agent keeps it among its few newest and then
  drops it (a downstream that needs its endpoint has it in its own assignment).

A `version: follow` job uses `follow.ferry.dev/<uid>` (the operator's
`FollowAssignment`: the source replica followed, the upstream pulled from, the pull
options) and `followreport.ferry.dev/<uid>` (the follower's `FollowReport`: version
served, when, the last pull's outcome), the same way.

All of them are read from annotations that a bug or a compromised pod could fill with
anything, so the models bound every number (finite, int64) and a reader that
meets a bad value drops that value, never the whole reconcile: one report with
`"seconds": Infinity` or `"bytes": 2**70` once made every status write of its job
fail (invalid JSON / beyond int64 for the apiserver), including the finalizer's.

Why not the RefitJob itself: with every agent writing its entry into one object,
each write cost the apiserver work proportional to the object (1,000 entries:
~300 kB decoded, validated, diffed for managedFields and re-encoded per write), so
a job's reports cost O(N²) and a 1,000-target job did not finish in 10 minutes
(docs/benchmarks.md). A Lease write is O(1); the operator folds every report
into the job in one write per reconcile, and an agent watches only its own Lease
instead of every RefitJob.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Self
from urllib.parse import quote

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic.alias_generators import to_camel

from . import times
from .ranks import MAX_RANKS_PER_POD, pods_of
from .refitjob import RefitJobSpec

LEASE_LABEL = "ferry.dev/agent-lease"
ASSIGN = "assign.ferry.dev/"
REPORT = "report.ferry.dev/"
# RefitJob version: follow (ferry_agent.k8s.following): the operator's follow assignment
# (source and upstream endpoints) and the follower's rate-limited report of what it serves.
FOLLOW = "follow.ferry.dev/"
FOLLOW_REPORT = "followreport.ferry.dev/"
MERGE_PATCH = "application/merge-patch+json"
# A Lease name is a DNS-1123 subdomain (what the apiserver validates on create).
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def lease_name(pod: str) -> str:
    return f"ferry-agent-{pod}"[:253]


# The apiserver's integers are int64; a larger one makes the whole object's write fail.
INT64_MAX = (1 << 63) - 1
# No pull takes longer than a job may run (spec.timeoutSeconds <= 86400); a report
# claiming more is not a duration.
MAX_SECONDS = 1e7
REPORTED_PHASES = ("Pulling", "Done", "Failed")
ReportPhase = Literal["Pulling", "Done", "Failed"]


# One encoder (json.dumps with these options builds a new one per call).
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode(value: Any) -> str:
    """Canonical JSON, so that equal values compare equal as annotation strings. Never
    NaN or Infinity (not JSON: the reader's json.loads takes them, the apiserver not)."""
    return _JSON.encode(value)


def _or_none(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A field that is dropped (None) when its value is bad, instead of failing the whole
    payload: one bad number in a report must not hide its phase."""
    try:
        return handler(value)
    except ValidationError:
        return None


def _cut(limit: int) -> BeforeValidator:
    return BeforeValidator(lambda v: v[:limit] if isinstance(v, str) else v)


Count = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
Attempt = Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
Seconds = Annotated[float, Field(strict=True, ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Reason = Annotated[str, Field(strict=True, min_length=1), _cut(128)]
Message = Annotated[str, Field(strict=True, min_length=1), _cut(1024)]
Endpoint = Annotated[str, Field(strict=True, min_length=1, max_length=300)]
Time = Annotated[datetime, PlainSerializer(times.stamp, return_type=str)]


class _Payload(BaseModel):
    """A Lease payload: camelCase on the wire, unknown keys ignored (a newer agent or
    operator may add one), frozen."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def encode(self) -> str:
        return encode(self.wire())

    @classmethod
    def parse(cls, raw: Any) -> Self | None:
        """`raw` (decoded JSON, or already the model) as this payload; None when it is not one."""
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError:
            return None


class Report(_Payload):
    """An agent's report on one job (`report.ferry.dev/<uid>`). `attempt` and `phase` must
    be valid or the report is not one (parse gives None); any other bad field is dropped."""

    attempt: Attempt = Field(description="The assigned attempt this report is on.")
    phase: ReportPhase = Field(description="Pulling, Done or Failed.")
    bytes: Annotated[Count | None, WrapValidator(_or_none)] = Field(
        default=None,
        description="Bytes pulled so far (int64; the operator also drops more than the job's total).",
    )
    seconds: Annotated[Seconds | None, WrapValidator(_or_none)] = Field(
        default=None, description="Duration of the successful pull (finite)."
    )
    reason: Annotated[Reason | None, WrapValidator(_or_none)] = Field(
        default=None, description="CamelCase reason of a failure (cut to 128 characters)."
    )
    message: Annotated[Message | None, WrapValidator(_or_none)] = Field(
        default=None, description="Detail of a failure (cut to 1024 characters)."
    )
    endpoint: Annotated[Endpoint | None, WrapValidator(_or_none)] = Field(
        default=None, description="host:port of this agent's gRPC service."
    )

    @classmethod
    def decode(cls, raw: str | None) -> Report | None:
        """A report from its annotation's text; None when it is not one. Cached: a job's
        reconcile decodes every target's report each second, and most did not change."""
        if not isinstance(raw, str):
            return None
        return (
            _decode_report(raw)
            if len(raw) <= _CACHED_REPORT_CHARS
            else _decode_report.__wrapped__(raw)
        )

    @property
    def final(self) -> bool:
        return self.phase in ("Done", "Failed")


# A report is ~150 characters; an annotation anyone could edit may be far larger, and
# is decoded without keeping it.
_CACHED_REPORT_CHARS = 2048


@functools.lru_cache(maxsize=16384)
def _decode_report(raw: str) -> Report | None:
    try:
        return Report.parse(json.loads(raw))
    except ValueError:
        return None


class RankAssignment(_Payload):
    """What one local rank of a target pulls: its upstream rank addresses (`pod` or
    `pod/localRank`, ferry_api.ranks), in stripe order, or for reshard one per source
    rank in rank order."""

    local_rank: int = Field(ge=0, le=MAX_RANKS_PER_POD - 1, description="The target's local rank.")
    sources: list[Annotated[str, Field(min_length=1, max_length=300)]] = Field(
        min_length=1, max_length=64, description="Upstream rank addresses."
    )


class Assignment(_Payload):
    """The attempt a target must run now (`assign.ferry.dev/<uid>`), written by the operator.

    `source`: the upstream pods, comma-separated, in stripe order (source replicas or,
    for tree and chain, other targets). `endpoints`: the gRPC endpoints of those
    upstream targets that the operator has seen reported, so a downstream does not
    depend on its upstream's report staying on the upstream's Lease (an agent keeps
    only its few newest reports)."""

    job: str = Field(min_length=1, max_length=253, description="The RefitJob's name.")
    attempt: Attempt = Field(description="The target's entry's attempts: the attempt to run now.")
    source: str = Field(
        default="",
        max_length=4096,
        description="Upstream pods, comma-separated, in stripe order (the entry's source).",
    )
    version: str | None = Field(
        default=None, max_length=128, description="The job's resolved version."
    )
    start_time: Time | None = Field(
        default=None, description="The job's startTime (its deadline counts from it)."
    )
    spec: RefitJobSpec = Field(
        description="The job's spec, validated by the agent with the same model."
    )
    endpoints: dict[str, str] | None = Field(
        default=None,
        description="Upstream target pod -> the endpoint it reported, as far as the operator saw.",
    )

    ranks: list[RankAssignment] | None = Field(
        default=None,
        max_length=64,
        description="With ranks inside pods: what each local rank of the target pulls; unset for a pod of "
        "one rank pulling from pods of one rank (then `source` says it all).",
    )

    @property
    def upstream(self) -> tuple[str, ...]:
        """The distinct upstream pods (a rank address `pod/l` names its pod)."""
        return pods_of(self.source)

    @classmethod
    def from_annotation(cls, raw: Any) -> Assignment:
        """Raises ValidationError naming the bad field."""
        return cls.model_validate(raw)


class FollowAssignment(_Payload):
    """What a target follows for a `version: follow` job (`follow.ferry.dev/<uid>`),
    written by the operator: the source replica it follows (and reports to) and the
    upstream it pulls from (None: straight from the source), with the pull options."""

    job: str = Field(min_length=1, max_length=253, description="The RefitJob's name.")
    source: str = Field(
        min_length=1, max_length=253, description="The source replica (pod) followed."
    )
    source_endpoint: Endpoint = Field(description="Its agent's gRPC endpoint.")
    upstream: str | None = Field(
        default=None, max_length=253, description="The target pulled from, if not the source."
    )
    upstream_endpoint: Endpoint | None = Field(default=None, description="That target's endpoint.")
    timeout_seconds: int = Field(
        default=600, ge=1, le=86400, description="The job's spec.timeoutSeconds, per pull."
    )
    chunk_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="spec.strategy.chunkBytes."
    )
    pause: Literal["engine", "doubleBuffer", "none"] = Field(
        default="engine", description="spec.pause.mode."
    )

    @classmethod
    def from_annotation(cls, raw: Any) -> FollowAssignment:
        """Raises ValidationError naming the bad field."""
        return cls.model_validate(raw)


class FollowReport(_Payload):
    """What a follower serves (`followreport.ferry.dev/<uid>`), written by its agent at
    most once a second. Every field is dropped when bad, never the report."""

    endpoint: Annotated[Endpoint | None, WrapValidator(_or_none)] = Field(
        default=None,
        description="host:port of this agent's gRPC service (downstreams pull from it).",
    )
    version: Annotated[
        Annotated[str, Field(strict=True, min_length=1), _cut(128)] | None, WrapValidator(_or_none)
    ] = Field(default=None, description="The version it serves.")
    ok: Annotated[Annotated[bool, Field(strict=True)] | None, WrapValidator(_or_none)] = Field(
        default=None, description="false: its last pull failed (reason, message)."
    )
    last_refit_time: Annotated[Time | None, WrapValidator(_or_none)] = Field(
        default=None, description="When it last served a new version."
    )
    bytes: Annotated[Count | None, WrapValidator(_or_none)] = Field(
        default=None, description="Bytes of the last pull."
    )
    seconds: Annotated[Seconds | None, WrapValidator(_or_none)] = Field(
        default=None, description="Duration of the last pull (finite)."
    )
    reason: Annotated[Reason | None, WrapValidator(_or_none)] = Field(
        default=None, description="Why it failed."
    )
    message: Annotated[Message | None, WrapValidator(_or_none)] = Field(
        default=None, description="Detail."
    )


def encode_assignments(assignments: dict[str, Assignment]) -> dict[str, str]:
    """pod -> `a.encode()` for every assignment of one job, byte for byte, with what they
    all share (the spec, job, version, start time) serialized once: at 1,000 targets the
    operator encodes 1,000 assignments a reconcile, and dumping the same spec and start
    time into each was most of the reconcile's cost (docs/benchmarks.md, reconcile)."""
    shared: dict[tuple[int, str, str | None, datetime | None], dict[str, str]] = {}
    out: dict[str, str] = {}
    for pod, a in assignments.items():
        key = (id(a.spec), a.job, a.version, a.start_time)
        common = shared.get(key)
        if common is None:
            head = a.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(_SHARED))
            common = shared[key] = {k: encode(v) for k, v in head.items()}
        rest = a.model_dump(by_alias=True, exclude_none=True, mode="json", exclude=set(_SHARED))
        parts = common | {k: encode(v) for k, v in rest.items()}
        # The keys are field aliases (ASCII identifiers): quoted as json.dumps would.
        out[pod] = "{" + ",".join(f'"{k}":{parts[k]}' for k in sorted(parts)) + "}"
    return out


_SHARED = ("spec", "job", "version", "start_time")


def attempt_of(raw: Any) -> int:
    """The attempt number of a payload that may be invalid otherwise; 0 if it has none."""
    return count(raw.get("attempt")) or 0 if isinstance(raw, dict) else 0


def read(annotations: dict[str, str] | None, prefix: str) -> dict[str, dict[str, Any]]:
    """uid -> decoded value of every `prefix<uid>` annotation; malformed ones are skipped
    (an annotation anyone could edit must not crash the reader)."""
    out: dict[str, dict[str, Any]] = {}
    for key, raw in (annotations or {}).items():
        if not key.startswith(prefix):
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            out[key[len(prefix) :]] = value
    return out


def count(value: Any) -> int | None:
    """A non-negative int64 from an annotation anyone could edit (JSON `true` is not 1),
    else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX
    return value if ok else None


def patch(
    api: Any,
    namespace: str,
    pod: str,
    annotations: dict[str, str | None],
    manager: str,
    timeout_s: float = 30.0,
) -> None:
    """Set (or, with None, remove) annotations on `pod`'s agent Lease with a merge patch:
    only these keys change, so the agent's renewals and the operator's assignments
    never overwrite each other. Raises ApiException (404: the Lease does not exist).

    A bare PATCH on the API client's connection pool: the operator assigns 1,000 targets
    with 1,000 of these, and the generated client spends ~3 ms of Python per call (1,000
    Lease patches from 16 threads: 3.2 s through it, 1.15 s bare; docs/benchmarks.md)."""
    from kubernetes import client

    cfg = api.configuration
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)  # in-cluster: the projected token rotates
    headers = {"Content-Type": MERGE_PATCH, "Accept": "application/json"}
    # The bearer token where the client keeps it (kubeconfig and in-cluster config both
    # store api_key["BearerToken"]; reading "authorization" sent every PATCH anonymous).
    for auth in cfg.auth_settings().values():
        if auth["in"] == "header" and auth["value"]:
            headers[auth["key"]] = auth["value"]
    name = lease_name(pod)
    # `pod` may come from a holderIdentity anyone in the namespace can write: a name
    # with `/` or `..` would point this PATCH at another object.
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        raise ValueError(f"{name!r} (agent Lease of pod {pod!r}) is not a valid Lease name")
    url = (
        f"{cfg.host}/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}/leases/"
        f"{quote(name, safe='')}?fieldManager={quote(manager, safe='')}"
    )
    body = json.dumps({"metadata": {"annotations": annotations}}).encode()
    resp = api.rest_client.pool_manager.request(
        "PATCH", url, body=body, headers=headers, timeout=timeout_s
    )
    if not 200 <= resp.status < 300:
        exc = client.ApiException(status=resp.status, reason=resp.reason)
        exc.body = (
            resp.data.decode(errors="replace") if resp.data else None
        )  # the refusal's message
        raise exc

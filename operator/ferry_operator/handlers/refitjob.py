"""RefitJob: resolve the version, assign sources to targets, aggregate progress.

The operator alone writes the job's status. A target's agent learns of its
attempt from an assignment on its own Lease and reports on that Lease
(ferry_api.leases); each reconcile folds the reports on each target's current
attempt into its entry (`phase`, `bytes`, ...) and writes the job once. A new attempt
is assigned by bumping `attempts`; the assignment on the Lease follows.

compute_status runs four named steps over what one reconcile read (World):
1. resolve_version: the version this job moves (`latest` resolves once, then sticks);
2. fold_entries: each target's entry with its agent's report, its Lease and its pod
   applied (a lost Lease fails the attempt once; a target that is gone leaves);
3. judge: the job's phase and conditions (finished, refused, past its deadline,
   waiting for its source, or running);
4. assign: while it runs, new attempts for the targets that need a source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ferry_api import leases, ranks, times
from ferry_api.refitjob import RefitJob, RefitJobSpec, RefitJobStatus

from ..conditions import Cond, is_true, set_conditions
from ..planner import Peer, TargetState
from . import refit_transform

KIND, PLURAL = RefitJob.KIND, RefitJob.PLURAL
TERMINAL = ("Succeeded", "Failed")
# Phases of an entry that nothing changes any more: its attempt ended (Failed may
# still be retried with a new attempt), or its pod left the job.
SETTLED = ("Done", "Failed", "Left")
INT64_MAX = leases.INT64_MAX


@dataclass(frozen=True)
class World:
    """What one reconcile read: the source object, the selected target pods (name ->
    node; pods being deleted are in `terminating` instead), the pods whose agent Lease
    is fresh (or expired, and from when a lost attempt may be re-assigned), the clock,
    the target pods' labels (their tensor-parallel rank, see refit_transform) and each
    pod's report on this job."""

    source: dict[str, Any] | None
    targets: dict[str, str | None]
    live: set[str]
    now: datetime
    expired: set[str] = field(default_factory=set)  # pods whose agent Lease expired
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # target pod -> labels
    # pod -> its agent's report (as decoded from its Lease; wire form is parsed on use)
    reports: dict[str, leases.Report | dict[str, Any]] = field(default_factory=dict)
    terminating: set[str] = field(default_factory=set)  # target pods being deleted
    # pod -> when an attempt lost with its expired Lease may be re-assigned (expiry plus
    # a grace of one lease duration, at least one renewal interval); absent: now.
    retry_at: dict[str, datetime] = field(default_factory=dict)


@dataclass
class Decision:
    """The reconcile's outcome: the job's status as its API model (validated here, so a
    value the apiserver would refuse is found with its field named), whether to delete
    the job (ttlSecondsAfterFinished), and what was assigned (pod -> upstream pods)."""

    model: RefitJobStatus
    delete: bool = False
    assigned: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def status(self) -> dict[str, Any]:
        """The status in wire form, as it is applied."""
        return self.model.wire()


def parse_time(value: str | None) -> datetime | None:
    return times.parse(value)


# What an agent's report sets on its entry (ferry_api.leases.Report, which bounds
# every value: a report is an annotation, and one bad value must not make the whole
# status write fail).
REPORTED = ("phase", "bytes", "reason", "message", "seconds", "endpoint")
REPORTED_PHASES = leases.REPORTED_PHASES


# -- step 1 ---------------------------------------------------------------------------
def resolve_version(
    spec: RefitJobSpec, status: dict[str, Any], source: dict[str, Any] | None
) -> str | None:
    """The version this job moves: the one it resolved before, the spec's, or (`latest`)
    the source's current one once the source is Ready. Resolved once, then it sticks."""
    version = status.get("version") or (None if spec.version == "latest" else spec.version)
    src = (source or {}).get("status") or {}
    if version is None and src.get("version") and is_true(src.get("conditions"), "Ready"):
        version = src["version"]
    return version


# -- step 2 ---------------------------------------------------------------------------
def fold(
    entry: dict[str, Any],
    report: leases.Report | dict[str, Any] | None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """`entry` with its agent's report on it. An entry's phase always describes its
    current attempt (`attempts`; no phase: assigned, not started), so only a report on
    that attempt counts (an attempt the operator never assigned is ignored), and only
    until the attempt settled. Bad values are left out: numbers beyond int64 or not
    finite, and `bytes` beyond `max_bytes` (the job's total, when known)."""
    if not report or entry.get("phase") in SETTLED:
        return entry
    r = report if isinstance(report, leases.Report) else leases.Report.parse(report)
    if r is None or r.attempt != entry.get("attempts"):
        return entry
    out = {k: v for k, v in entry.items() if k not in REPORTED} | {"phase": r.phase}
    if r.bytes is not None and (not max_bytes or r.bytes <= max_bytes):
        out["bytes"] = r.bytes
    for key in ("seconds", "reason", "message", "endpoint"):
        if getattr(r, key) is not None:
            out[key] = getattr(r, key)
    return out


def lose(entry: dict[str, Any], expired: bool, grace_over: bool) -> dict[str, Any]:
    """An attempt in hand whose agent's Lease expired, once the grace period is over,
    is over: Failed with AgentUnavailable, counted once (the entry settles). An
    attempt assigned while the Lease was already lost (it carries that reason and no
    phase) is not counted again until its agent has taken it."""
    if not expired or not grace_over or not entry.get("attempts") or entry.get("phase") in SETTLED:
        return entry
    if entry.get("phase") is None and entry.get("reason") == "AgentUnavailable":
        return entry
    kept = {k: v for k, v in entry.items() if k not in REPORTED}
    return kept | {
        "phase": "Failed",
        "reason": "AgentUnavailable",
        "message": f"the agent's Lease expired during attempt {entry['attempts']}",
    }


def leave(
    entry: dict[str, Any], selected: bool, terminating: bool, backoff_limit: int
) -> dict[str, Any]:
    """A target whose pod is gone, being deleted, or no longer selected leaves the job:
    its entry says so (phase Left) and the job completes without it. A cleanly stopped
    agent deletes its Lease, so such a pod never counts as lost."""
    if (
        selected
        or not entry.get("attempts")
        or target_phase(entry, backoff_limit) in ("Done", "Failed", "Left")
    ):
        return entry
    reason, why = (
        ("PodDeleted", "is being deleted")
        if terminating
        else ("PodGone", "is gone or no longer matches spec.targets")
    )
    kept = {k: v for k, v in entry.items() if k not in REPORTED}
    return kept | {
        "phase": "Left",
        "reason": reason,
        "message": f"pod {entry['pod']} {why}; the job completes without it",
    }


@dataclass(frozen=True)
class Targets:
    """The targets after step 2: `entries` (pod -> entry; every pod with an assignment,
    and pods that cannot take part), `names` (the pods the job counts: selected or
    assigned, not left) with their effective `phases`, and each target's rank."""

    entries: dict[str, dict[str, Any]]
    names: list[str]
    phases: dict[str, str]
    ranks: dict[str, int] | None
    left: list[str]

    def having(self, phase: str) -> list[str]:
        return [p for p in self.names if self.phases[p] == phase]


def fold_entries(
    spec: RefitJobSpec, status: dict[str, Any], world: World, per_target: int
) -> Targets:
    total = per_target * max(
        1, len(set(world.targets) | {e["pod"] for e in status.get("targets") or []})
    )
    entries: dict[str, dict[str, Any]] = {}
    for e in status.get("targets") or []:
        pod = e["pod"]
        selected = pod in world.targets
        e = fold(e, world.reports.get(pod) if selected else None, total or None)
        e = leave(e, selected, pod in world.terminating, spec.backoff_limit)
        grace_over = world.now >= world.retry_at.get(pod, world.now)
        entries[pod] = lose(e, pod in world.expired and pod not in world.live, grace_over)
    left = sorted(p for p, e in entries.items() if e.get("phase") == "Left")
    names = sorted(
        (set(world.targets) | {p for p, e in entries.items() if e.get("attempts")}) - set(left)
    )
    phases = {p: target_phase(entries.get(p, {}), spec.backoff_limit) for p in names}
    for p in names:
        if (
            phases[p] == "Retry"
            and p in world.expired
            and world.now < world.retry_at.get(p, world.now)
        ):
            phases[p] = "Held"  # lost, within its grace period: not re-assigned yet
    # A target that cannot take part (no or a bad rank label) fails before any attempt.
    ranks, unfit = refit_transform.target_ranks(
        spec, world.source, {p: world.labels.get(p, {}) for p in world.targets}
    )
    for p, (why, detail) in unfit.items():
        if phases.get(p) == "Pending":
            phases[p] = "Failed"
            entries[p] = {"pod": p, "phase": "Failed", "reason": why, "message": detail}
    keep = {p: e for p, e in entries.items() if e.get("attempts") or p in unfit}
    return Targets(keep, names, phases, ranks, left)


def target_phase(entry: dict[str, Any], backoff_limit: int) -> str:
    """The effective phase of a target from its entry: Pending (never assigned),
    Assigned, Pulling, Done, Left, Retry (failed, retries left) or Failed."""
    attempts = entry.get("attempts") or 0
    if attempts == 0:
        return "Pending"
    phase = entry.get("phase") or "Assigned"
    if phase == "Failed" and attempts <= backoff_limit:
        return "Retry"
    return str(phase)


def bytes_done(t: Targets, per_target: int) -> int:
    """Bytes moved: a Done target counts at least one full copy; capped at int64."""
    done = sum(
        (t.entries.get(p, {}).get("bytes") or 0)
        if t.phases[p] != "Done"
        else max(t.entries[p].get("bytes") or 0, per_target)
        for p in t.names
        if p in t.entries
    )
    return min(done, INT64_MAX)


# -- step 3 ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """The job's phase and conditions; `running`: step 4 assigns (and writes the
    Progressing message)."""

    phase: str
    conditions: list[Cond] = field(default_factory=list)
    completion: str | None = None
    running: bool = False


def judge(
    spec: RefitJobSpec,
    status: dict[str, Any],
    world: World,
    version: str | None,
    start: datetime,
    t: Targets,
) -> Outcome:
    phase = status.get("phase") or "Pending"
    now, names = times.stamp(world.now), t.names
    done, failed = t.having("Done"), t.having("Failed")
    refused = refit_transform.refusal(spec, world.source)
    if phase in TERMINAL:
        return Outcome(phase, _terminal_conditions(status), status.get("completionTime"))
    if refused is not None:
        return Outcome(
            "Failed",
            [
                Cond("Progressing", False, refused.reason, ""),
                Cond("Complete", False, refused.reason, ""),
                refused,
            ],
            now,
        )
    if world.now >= start + timedelta(seconds=spec.timeout_seconds):
        return Outcome(
            "Failed",
            [
                Cond("Progressing", False, "DeadlineExceeded", ""),
                Cond("Complete", False, "DeadlineExceeded", ""),
                Cond(
                    "Failed",
                    True,
                    "DeadlineExceeded",
                    f"not finished within spec.timeoutSeconds={spec.timeout_seconds}: "
                    f"{len(done)}/{len(names)} targets done",
                ),
            ],
            now,
        )
    if names and len(done) + len(failed) == len(names):
        return Outcome(*_finished(spec, t, version), now)
    if world.source is None:
        return Outcome(
            phase,
            _waiting(
                Cond(
                    "Progressing",
                    False,
                    "SourceNotFound",
                    f"WeightSource {spec.source_ref.name!r} not found in this namespace; "
                    "create it or fix spec.sourceRef.name",
                )
            ),
        )
    if not version:
        return Outcome(
            phase,
            _waiting(
                Cond(
                    "Progressing",
                    False,
                    "SourceNotReady",
                    f"WeightSource {spec.source_ref.name!r} has no Ready replica",
                )
            ),
        )
    if not names:
        return Outcome(
            phase,
            _waiting(
                Cond(
                    "Progressing",
                    False,
                    "NoTargets",
                    f"no pods match spec.targets ({spec.targets.to_label_selector()})",
                )
            ),
        )
    return Outcome("Running", running=True)


def _finished(spec: RefitJobSpec, t: Targets, version: str | None) -> tuple[str, list[Cond]]:
    done, failed, names = t.having("Done"), t.having("Failed"), t.names
    left = f"; {len(t.left)} left the job ({', '.join(t.left[:5])})" if t.left else ""
    if not failed:
        return "Succeeded", [
            Cond("Progressing", False, "Finished", ""),
            Cond(
                "Complete",
                True,
                "AllTargetsDone",
                f"{len(done)} target(s) hold version {version}{left}",
            ),
            Cond("Failed", False, "AsExpected", ""),
        ]
    reasons = [_reason(t.entries[p]) for p in failed]
    why = "; ".join(f"{p}: {r}" for p, r in zip(failed[:5], reasons, strict=False))
    reason = _common_reason(reasons) or "TargetsFailed"
    return "Failed", [
        Cond("Progressing", False, "Finished", ""),
        Cond("Complete", False, reason, ""),
        Cond(
            "Failed",
            True,
            reason,
            f"{len(failed)}/{len(names)} targets failed after "
            f"spec.backoffLimit={spec.backoff_limit} retries: {why}{left}",
        ),
    ]


# -- step 4 ---------------------------------------------------------------------------
def assign(
    spec: RefitJobSpec, world: World, version: str, t: Targets
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, ...]], list[Cond]]:
    """New attempts for the targets that need a source: the entries after them, what was
    assigned (pod -> upstream pods) and the running job's conditions."""
    assert world.source is not None
    sources = ready_sources(world.source, version, world.live)
    states = [_state(p, t.entries.get(p, {}), t.phases[p], world.targets.get(p)) for p in t.names]
    plan_ = refit_transform.plan_targets(
        spec, world.source, version, world.live, states, t.ranks, sources
    )
    entries = dict(t.entries)
    for pod, upstream in plan_.assign.items():
        attempts = (entries.get(pod, {}).get("attempts") or 0) + 1
        # A new attempt starts without a phase (Assigned); the last failure's reason
        # and message stay until the agent reports on this one.
        last = {k: v for k, v in entries.get(pod, {}).items() if k in ("reason", "message")}
        source = (
            ranks.join_groups(list(plan_.groups[pod]))
            if pod in plan_.groups
            else ",".join(upstream)
        )
        entries[pod] = {"pod": pod, "source": source, "attempts": attempts, **last}
    waiting = len(plan_.waiting) + len(plan_.exhausted)
    msg = f"{len(t.having('Done'))}/{len(t.names)} targets done"
    if waiting:
        msg += f", {waiting} waiting for a free source"
    if t.left:
        msg += f", {len(t.left)} left"
    conds = [
        Cond("Progressing", True, "Transferring", msg),
        Cond("Complete", False, "InProgress", ""),
        Cond("Failed", False, "AsExpected", ""),
    ]
    return entries, dict(plan_.assign), conds


def compute_status(
    spec: RefitJobSpec, status: dict[str, Any], generation: int, world: World
) -> Decision:
    start = times.parse(status.get("startTime")) or world.now
    version = resolve_version(spec, status, world.source)
    per_target = refit_transform.bytes_per_target(spec, world.source)
    t = fold_entries(spec, status, world, per_target)
    outcome = judge(spec, status, world, version, start, t)
    assigned: dict[str, tuple[str, ...]] = {}
    entries, conds = t.entries, outcome.conditions
    if outcome.running and version:
        entries, assigned, conds = assign(spec, world, version, t)
        t = replace(t, entries=entries)
    out = _summary(spec, status, generation, world, version, start, t, per_target, outcome)
    if entries:
        out["targets"] = [entries[p] for p in sorted(entries)]
    out["conditions"] = set_conditions(status.get("conditions"), conds, generation, world.now)
    finished_at = times.parse(outcome.completion)
    delete = (
        finished_at is not None
        and spec.ttl_seconds_after_finished is not None
        and world.now >= finished_at + timedelta(seconds=spec.ttl_seconds_after_finished)
    )
    return Decision(RefitJobStatus.model_validate(out), delete, assigned)


def _summary(
    spec: RefitJobSpec,
    status: dict[str, Any],
    generation: int,
    world: World,
    version: str | None,
    start: datetime,
    t: Targets,
    per_target: int,
    outcome: Outcome,
) -> dict[str, Any]:
    """The job's top-level fields; a finished job's numbers are frozen at completion."""
    out: dict[str, Any] = {"observedGeneration": generation, "startTime": times.stamp(start)}
    if version:
        out["version"] = version
    fingerprint = status.get("fingerprint") or ((world.source or {}).get("status") or {}).get(
        "fingerprint"
    )
    if fingerprint:
        out["fingerprint"] = fingerprint
    out["phase"] = outcome.phase
    if outcome.completion:
        out["completionTime"] = outcome.completion
    out["targetsSummary"] = f"{len(t.having('Done'))}/{len(t.names)}"
    if per_target:
        out["bytesTotal"] = min(per_target * len(t.names), INT64_MAX)
    done = out["bytesDone"] = bytes_done(t, per_target)
    elapsed = ((times.parse(outcome.completion) or world.now) - start).total_seconds()
    if done and elapsed > 0:
        out["throughput"] = rate(done / elapsed)
    if status.get("phase") in TERMINAL:
        for key in ("bytesTotal", "bytesDone", "throughput"):
            if key in status:
                out[key] = status[key]
    return out


def assignments(
    name: str, spec: RefitJobSpec, status: dict[str, Any]
) -> dict[str, leases.Assignment]:
    """pod -> the attempt its agent must run now (the Lease annotation, ferry_api.leases):
    every target with an attempt in hand while the job runs. Everything the agent needs
    is in it, upstream targets' endpoints included, so no agent ever reads the (large)
    job object, and a downstream does not depend on its upstream's report staying on
    the upstream's Lease."""
    if status.get("phase") in TERMINAL:
        return {}
    entries = {e["pod"]: e for e in status.get("targets") or []}
    start = times.parse(status.get("startTime"))
    out: dict[str, leases.Assignment] = {}
    for pod, e in entries.items():
        if target_phase(e, 1 << 30) not in ("Assigned", "Pulling"):
            continue
        source = e.get("source") or ""
        upstream = ranks.pods_of(source)
        endpoints = {
            u: entries[u]["endpoint"] for u in upstream if entries.get(u, {}).get("endpoint")
        }
        # Ranks inside pods: each local rank of the target pulls its own group.
        per_rank = (
            [
                leases.RankAssignment(local_rank=r, sources=list(g))
                for r, g in enumerate(ranks.split_groups(source))
            ]
            if ranks.per_rank(source)
            else None
        )
        out[pod] = leases.Assignment(
            job=name,
            attempt=e["attempts"],
            source=source,
            version=status.get("version"),
            start_time=start,
            spec=spec,
            endpoints=endpoints or None,
            ranks=per_rank,
        )
    return out


def fold_cancelled(
    status: dict[str, Any], reports: Mapping[str, leases.Report | dict[str, Any]], live: set[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """A deleted job's entries with its agents' last reports on them (who cancelled,
    with how many bytes), and the targets whose live agent still reports Pulling."""
    total = leases.count(status.get("bytesTotal")) or None
    entries = [fold(e, reports.get(e["pod"]), total) for e in status.get("targets") or []]
    pulling = [
        e["pod"] for e in entries if e["pod"] in live and target_phase(e, 1 << 30) == "Pulling"
    ]
    return entries, pulling


def ready_sources(source: dict[str, Any], version: str | None, live: set[str]) -> list[Peer]:
    status = source.get("status") or {}
    return [
        Peer(m["pod"], m.get("node"))
        for m in status.get("members") or []
        if m.get("state") == "Ready"
        and m.get("pod") in live
        and m.get("endpoint")
        and (version is None or m.get("version") == version)
        and m.get("fingerprint") == status.get("fingerprint")
    ]


def _state(pod: str, entry: dict[str, Any], phase: str, node: str | None) -> TargetState:
    raw = entry.get("source") or ""
    groups = tuple(ranks.split_groups(raw)) if ranks.per_rank(raw) else ()
    sources = (
        tuple(a for g in groups for a in g) if groups else tuple(s for s in raw.split(",") if s)
    )
    failed = frozenset(sources) if phase == "Retry" else frozenset()
    return TargetState(pod, node, "Pending" if phase == "Retry" else phase, sources, failed, groups)


def _waiting(progressing: Cond) -> list[Cond]:
    return [
        progressing,
        Cond("Complete", False, "NotStarted", ""),
        Cond("Failed", False, "AsExpected", ""),
    ]


def _terminal_conditions(status: dict[str, Any]) -> list[Cond]:
    return [
        Cond(
            c["type"],
            {"True": True, "False": False}.get(c["status"]),
            c["reason"],
            c.get("message", ""),
        )
        for c in status.get("conditions") or []
        if c["type"] in ("Progressing", "Complete", "Failed")
    ]


def _reason(entry: dict[str, Any]) -> str:
    return entry.get("reason") or "Failed"


def _common_reason(reasons: list[str]) -> str | None:
    distinct = {r for r in reasons if r}
    return distinct.pop() if len(distinct) == 1 else None


def rate(bytes_per_s: float) -> str:
    """Decimal units, as NICs and NVLink are quoted: 12.34GB/s, 850.0MB/s."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f}GB/s"
    return f"{bytes_per_s / 1e6:.1f}MB/s"

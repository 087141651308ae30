"""RefitJob: resolve the version, assign sources to targets, aggregate progress.

The operator alone writes the job's status. A target's agent learns of its
attempt from an assignment on its own Lease and reports on that Lease
(ferry_api.leases); each reconcile folds the reports on each target's current
attempt into its entry (`phase`, `bytes`, ...) and writes the job once. A new attempt
is assigned by bumping `attempts`; the assignment on the Lease follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ferry_api import leases
from ferry_api.refitjob import RefitJob, RefitJobSpec

from ..conditions import Cond, is_true, set_conditions
from ..planner import Peer, TargetState
from . import refit_transform

KIND, PLURAL = RefitJob.KIND, RefitJob.PLURAL
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class World:
    """What one reconcile read: the source object, the target pods (name -> node),
    the pods whose agent Lease is fresh (or expired), the clock, and the target
    pods' labels (their tensor-parallel rank, see refit_transform)."""

    source: dict[str, Any] | None
    targets: dict[str, str | None]
    live: set[str]
    now: datetime
    expired: set[str] = field(default_factory=set)  # pods whose agent Lease expired
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # target pod -> labels
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> its agent's report


@dataclass
class Decision:
    status: dict[str, Any]
    delete: bool = False
    assigned: dict[str, tuple[str, ...]] = field(default_factory=dict)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# What an agent's report sets on its entry (ferry_api.leases), and the limits the
# CRD puts on them: a report is an annotation anyone with Lease access could edit,
# and one bad value must not make the whole status write fail.
REPORTED = ("phase", "bytes", "reason", "message", "seconds")
REPORTED_PHASES = ("Pulling", "Done", "Failed")


def fold(entry: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any]:
    """`entry` with its agent's report on it. An entry's phase always describes its
    current attempt (`attempts`; no phase: assigned, not started), so only a report on
    that attempt counts, and only until the attempt is Done or Failed."""
    if not report or entry.get("phase") in ("Done", "Failed"):
        return entry
    n, phase = leases.count(report.get("attempt")), report.get("phase")
    if not n or n != entry.get("attempts") or phase not in REPORTED_PHASES:
        return entry
    out = {k: v for k, v in entry.items() if k not in REPORTED} | {"phase": phase}
    nbytes, seconds = leases.count(report.get("bytes")), report.get("seconds")
    if nbytes is not None:
        out["bytes"] = nbytes
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
        out["seconds"] = float(seconds)
    for key, limit in (("reason", 128), ("message", 1024)):
        if isinstance(report.get(key), str) and report[key]:
            out[key] = report[key][:limit]
    return out


def target_phase(entry: dict[str, Any], backoff_limit: int, lost: bool = False) -> str:
    """The effective phase of a target from its entry.

    `lost`: the target's agent Lease expired, so an attempt it had in hand is
    over (its agent died or hangs); the attempt counts as failed."""
    attempts = entry.get("attempts") or 0
    if attempts == 0:
        return "Pending"
    if lost and entry.get("phase") != "Done":
        return "Retry" if attempts <= backoff_limit else "Failed"
    phase = entry.get("phase") or "Assigned"
    if phase == "Failed" and attempts <= backoff_limit:
        return "Retry"
    return phase


def ready_sources(source: dict[str, Any], version: str | None, live: set[str]) -> list[Peer]:
    status = source.get("status") or {}
    return [
        Peer(m["pod"], m.get("node"))
        for m in status.get("members") or []
        if m.get("state") == "Ready" and m.get("pod") in live and m.get("endpoint")
        and (version is None or m.get("version") == version)
        and m.get("fingerprint") == status.get("fingerprint")
    ]


def compute_status(spec: RefitJobSpec, status: dict[str, Any], generation: int, world: World) -> Decision:
    src_status = (world.source or {}).get("status") or {}
    out: dict[str, Any] = {"observedGeneration": generation}
    phase = status.get("phase") or "Pending"
    start = parse_time(status.get("startTime")) or world.now
    out["startTime"] = _stamp(start)
    version = status.get("version") or (None if spec.version == "latest" else spec.version)
    if version is None and src_status.get("version") and is_true(src_status.get("conditions"), "Ready"):
        version = src_status["version"]  # `latest` resolves once, then sticks
    if version:
        out["version"] = version
    if status.get("fingerprint") or src_status.get("fingerprint"):
        out["fingerprint"] = status.get("fingerprint") or src_status.get("fingerprint")

    entries = {e["pod"]: fold(e, world.reports.get(e["pod"])) for e in status.get("targets") or []}
    names = sorted(set(world.targets) | {p for p, e in entries.items() if e.get("attempts")})
    phases = {p: target_phase(entries.get(p, {}), spec.backoff_limit, p in world.expired)
              for p in names}
    done = [p for p in names if phases[p] == "Done"]
    # A target that cannot take part (no or a bad rank label) fails before any attempt.
    ranks, unfit = refit_transform.target_ranks(spec, world.source,
                                                {p: world.labels.get(p, {}) for p in world.targets})
    for p, (why, detail) in unfit.items():
        if phases.get(p) == "Pending":
            phases[p] = "Failed"
            entries[p] = {"pod": p, "phase": "Failed", "reason": why, "message": detail}
    failed = [p for p in names if phases[p] == "Failed"]
    per_target = refit_transform.bytes_per_target(spec, world.source)
    bytes_done = sum(
        (entries[p].get("bytes") or 0) if phases[p] != "Done" else max(entries[p].get("bytes") or 0, per_target)
        for p in names if p in entries)

    # Keep every entry with an assignment made so far.
    own = {p: e for p, e in entries.items() if e.get("attempts")}
    own |= {p: entries[p] for p in unfit if p in entries and not entries[p].get("attempts")}
    assigned: dict[str, tuple[str, ...]] = {}
    conds: list[Cond]
    completion = status.get("completionTime")

    refused = refit_transform.refusal(spec, world.source)
    if phase in TERMINAL:
        conds = _terminal_conditions(status)
    elif refused is not None:
        phase, completion = "Failed", _stamp(world.now)
        conds = [Cond("Progressing", False, refused.reason, ""),
                 Cond("Complete", False, refused.reason, ""), refused]
    elif world.now >= start + timedelta(seconds=spec.timeout_seconds):
        phase, completion = "Failed", _stamp(world.now)
        conds = [Cond("Progressing", False, "DeadlineExceeded", ""),
                 Cond("Complete", False, "DeadlineExceeded", ""),
                 Cond("Failed", True, "DeadlineExceeded",
                      f"not finished within spec.timeoutSeconds={spec.timeout_seconds}: "
                      f"{len(done)}/{len(names)} targets done")]
    elif names and len(done) + len(failed) == len(names):
        completion = _stamp(world.now)
        if failed:
            phase = "Failed"
            why = "; ".join(f"{p}: {_reason(entries[p], p in world.expired)}" for p in failed[:5])
            reason = _common_reason([_reason(entries[p], p in world.expired) for p in failed]) or "TargetsFailed"
            conds = [Cond("Progressing", False, "Finished", ""),
                     Cond("Complete", False, reason, ""),
                     Cond("Failed", True, reason,
                          f"{len(failed)}/{len(names)} targets failed after spec.backoffLimit={spec.backoff_limit} retries: {why}")]
        else:
            phase = "Succeeded"
            conds = [Cond("Progressing", False, "Finished", ""),
                     Cond("Complete", True, "AllTargetsDone",
                          f"{len(done)} target(s) hold version {version}"),
                     Cond("Failed", False, "AsExpected", "")]
    elif world.source is None:
        conds = _waiting(Cond("Progressing", False, "SourceNotFound",
                              f"WeightSource {spec.source_ref.name!r} not found in this namespace; "
                              "create it or fix spec.sourceRef.name"))
    elif not version:
        conds = _waiting(Cond("Progressing", False, "SourceNotReady",
                              f"WeightSource {spec.source_ref.name!r} has no Ready replica"))
    elif not names:
        conds = _waiting(Cond("Progressing", False, "NoTargets",
                              f"no pods match spec.targets ({spec.targets.to_label_selector()})"))
    else:
        sources = ready_sources(world.source, version, world.live)
        states = [_state(p, entries.get(p, {}), phases[p], world.targets.get(p)) for p in names]
        plan_ = refit_transform.plan_targets(spec, world.source, version, world.live, states, ranks,
                                             sources)
        for pod, upstream in plan_.assign.items():
            attempts = (entries.get(pod, {}).get("attempts") or 0) + 1
            # A new attempt starts without a phase (Assigned); the last failure's reason
            # and message stay until the agent reports on this one.
            last = {k: v for k, v in entries.get(pod, {}).items() if k in ("reason", "message")}
            own[pod] = {"pod": pod, "source": ",".join(upstream), "attempts": attempts, **last}
            assigned[pod] = upstream
        phase = "Running"
        waiting = len(plan_.waiting) + len(plan_.exhausted)
        msg = f"{len(done)}/{len(names)} targets done"
        if waiting:
            msg += f", {waiting} waiting for a free source"
        conds = [Cond("Progressing", True, "Transferring", msg),
                 Cond("Complete", False, "InProgress", ""),
                 Cond("Failed", False, "AsExpected", "")]

    out["phase"] = phase
    if completion:
        out["completionTime"] = completion
    out["targetsSummary"] = f"{len(done)}/{len(names)}"
    if per_target:
        out["bytesTotal"] = per_target * len(names)
    out["bytesDone"] = bytes_done
    end = parse_time(completion) or world.now
    elapsed = (end - start).total_seconds()
    if bytes_done and elapsed > 0:
        out["throughput"] = rate(bytes_done / elapsed)
    if status.get("phase") in TERMINAL:
        # A finished job's numbers are frozen at completion.
        for key in ("bytesTotal", "bytesDone", "throughput"):
            if key in status:
                out[key] = status[key]
    if own:
        out["targets"] = [own[p] for p in sorted(own)]
    out["conditions"] = set_conditions(status.get("conditions"), conds, generation, world.now)
    finished_at = parse_time(completion)
    delete = (finished_at is not None and spec.ttl_seconds_after_finished is not None
              and world.now >= finished_at + timedelta(seconds=spec.ttl_seconds_after_finished))
    return Decision(out, delete, assigned)


def assignments(name: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """pod -> the attempt its agent must run now (the Lease annotation, ferry_api.leases):
    every target with an attempt in hand while the job runs. Everything the agent needs
    is in it, so no agent ever reads the (large) job object."""
    if status.get("phase") in TERMINAL:
        return {}
    base = {"job": name, "version": status.get("version"), "startTime": status.get("startTime"),
            "spec": spec}
    return {e["pod"]: {**base, "attempt": e["attempts"], "source": e.get("source") or ""}
            for e in status.get("targets") or []
            if target_phase(e, 1 << 30) in ("Assigned", "Pulling")}


def _state(pod: str, entry: dict[str, Any], phase: str, node: str | None) -> TargetState:
    sources = tuple(s for s in (entry.get("source") or "").split(",") if s)
    failed = frozenset(sources) if phase == "Retry" else frozenset()
    return TargetState(pod, node, "Pending" if phase == "Retry" else phase, sources, failed)


def _waiting(progressing: Cond) -> list[Cond]:
    return [progressing, Cond("Complete", False, "NotStarted", ""), Cond("Failed", False, "AsExpected", "")]


def _terminal_conditions(status: dict[str, Any]) -> list[Cond]:
    return [Cond(c["type"], {"True": True, "False": False}.get(c["status"]), c["reason"], c.get("message", ""))
            for c in status.get("conditions") or [] if c["type"] in ("Progressing", "Complete", "Failed")]


def _reason(entry: dict[str, Any], lost: bool) -> str:
    if lost and entry.get("phase") != "Failed":
        return "AgentUnavailable"
    return entry.get("reason") or "Failed"


def _common_reason(reasons: list[str | None]) -> str | None:
    distinct = {r for r in reasons if r}
    return distinct.pop() if len(distinct) == 1 else None


def rate(bytes_per_s: float) -> str:
    """Decimal units, as NICs and NVLink are quoted: 12.34GB/s, 850.0MB/s."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f}GB/s"
    return f"{bytes_per_s / 1e6:.1f}MB/s"

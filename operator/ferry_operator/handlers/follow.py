"""RefitJob `version: follow`: continuous refit, decided once and kept current.

The control plane is off the per-step path. Each reconcile decides only

    membership   the selected target pods whose agent is live (source pods excluded)
    topology     who pulls from whom, by spec.strategy: direct (each target from a
                 source replica, round robin), chain (each from the one before it),
                 tree (each source or target relays to at most maxFanOut others)
    assignment   per target: the source agent it follows (and reports to) and the
                 upstream it pulls from, written on its agent's Lease
                 (`follow.ferry.dev/<job uid>`, ferry_api.leases)
    status       folded from the targets' rate-limited follow reports on their
                 Leases: per-target version and lastRefitTime, condition Synced

New versions then travel agent to agent (ferry_agent.follow): the trainer publishes,
the source notifies its followers, they pull and report to the source, and the
trainer's publish_and_wait returns. The job's status catches up a reconcile later.

Order is stable: targets keep their place in the chain or tree across reconciles (a
new pod is appended, a gone pod closes its gap), so a pod joining does not re-link
the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ferry_api import leases, times
from ferry_api.leases import FollowAssignment, FollowReport
from ferry_api.refitjob import RefitJobSpec, RefitJobStatus

from ..conditions import Cond, set_conditions

PHASE = "Following"


@dataclass(frozen=True)
class World:
    """What one reconcile read: the WeightSource object, the selected target pods
    (name -> node), the pods with a live agent Lease, each pod's follow report on this
    job (from its Lease), and the clock."""

    source: dict[str, Any] | None
    targets: dict[str, str | None]
    live: set[str]
    now: datetime
    # pod -> its follow report (ferry_api.leases.FollowReport; wire form is parsed on use)
    reports: Mapping[str, FollowReport | dict[str, Any]] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)  # pods whose agent Lease expired


@dataclass(frozen=True)
class Link:
    """One target's place: the source replica it follows and the target it pulls from
    (None: straight from the source)."""

    pod: str
    source: str
    upstream: str | None = None


@dataclass
class Decision:
    """The job's status as its API model (validated here, so a value the apiserver would
    refuse is found with its field named) and every target's follow assignment."""

    model: RefitJobStatus
    assignments: dict[str, FollowAssignment]  # pod -> its follow assignment

    @property
    def status(self) -> dict[str, Any]:
        """The status in wire form, as it is applied."""
        return self.model.wire()


# Source replica states a follower keeps following: a trainer writing its next version
# shows as Loading between publishes, and its followers must stay subscribed through it.
FOLLOWABLE = ("Ready", "Loading")


def source_replicas(source: dict[str, Any] | None, live: set[str]) -> dict[str, str]:
    """Live source replicas with an endpoint, Ready or being written: pod -> endpoint
    (any version: a follower takes whatever the source publishes next)."""
    st = (source or {}).get("status") or {}
    return {
        m["pod"]: m["endpoint"]
        for m in st.get("members") or []
        if m.get("state") in FOLLOWABLE and m.get("pod") in live and m.get("endpoint")
    }


def members(world: World, previous: list[str], sources: set[str]) -> list[str]:
    """Targets taking part, in a stable order: the previous order, then newcomers.

    A target whose agent Lease expired stays a member (its entry says AgentUnavailable):
    an agent starved of CPU for a few seconds must not be unassigned and re-linked, and
    an assignment left on a dead agent's Lease costs nothing (its source drops it when
    its Follow stream breaks). The pod leaving the selector, or being deleted, ends it."""
    now = {p for p in world.targets if p in world.live | world.expired and p not in sources}
    kept = [p for p in previous if p in now]
    return kept + sorted(now - set(kept))


def topology(strategy: str, fan_out: int, targets: list[str], sources: list[str]) -> list[Link]:
    """Each target's link, by strategy (see module docstring). `sources` non-empty."""
    out = []
    for i, pod in enumerate(targets):
        src = sources[i % len(sources)]
        if strategy == "chain":
            up = targets[i - 1] if i else None
            src = sources[0]
        elif strategy == "tree":
            # breadth first: the sources' maxFanOut children, then each target's
            slots = fan_out * len(sources)
            up = None if i < slots else targets[(i - slots) // fan_out]
        else:
            up = None
        out.append(Link(pod, src, up))
    return out


def _report_endpoint(report: FollowReport | None) -> str | None:
    ep = report.endpoint if report else None
    return ep if ep and ":" in ep else None


def assignment(
    job: str,
    spec: RefitJobSpec,
    link: Link,
    endpoints: dict[str, str],
    reports: Mapping[str, FollowReport],
) -> FollowAssignment:
    """What target `link.pod`'s agent follows (its Lease annotation). An upstream whose
    endpoint is not known yet (it has not reported) is left out: pull from the source."""
    up_ep = _report_endpoint(reports.get(link.upstream)) if link.upstream else None
    return FollowAssignment(
        job=job,
        source=link.source,
        source_endpoint=endpoints[link.source],
        upstream=link.upstream if up_ep else None,
        upstream_endpoint=up_ep,
        timeout_seconds=spec.timeout_seconds,
        chunk_bytes=spec.strategy.chunk_bytes,
        pause=spec.pause.mode,
    )


def entry(
    link: Link, report: FollowReport | None, latest: str | None, lost: bool = False
) -> dict[str, Any]:
    """A target's status entry from its latest follow report (FollowReport has dropped
    every bad value: the report is an annotation its pod can fill with anything)."""
    out: dict[str, Any] = {"pod": link.pod, "source": link.upstream or link.source}
    r = report or FollowReport()
    if r.version:
        out["version"] = r.version
    if r.last_refit_time is not None:
        out["lastRefitTime"] = times.stamp(r.last_refit_time)
    if r.bytes is not None:
        out["bytes"] = r.bytes
    if r.seconds is not None:
        out["seconds"] = r.seconds
    if lost:
        out["phase"], out["reason"] = "Failed", "AgentUnavailable"
        out["message"] = "the target's agent Lease expired; it keeps its place until the pod leaves"
    elif r.ok is False and r.reason:
        out["phase"], out["reason"], out["message"] = "Failed", r.reason, r.message or ""
    elif r.version and r.version == latest:
        out["phase"] = "Done"
    elif report:
        out["phase"] = "Pulling"
    else:
        out["phase"] = "Assigned"
    return out


def compute(
    name: str, spec: RefitJobSpec, status: dict[str, Any], generation: int, world: World
) -> Decision:
    """The job's status and every target's follow assignment."""
    src_status = (world.source or {}).get("status") or {}
    latest = src_status.get("version") or None
    found = ((p, FollowReport.parse(r)) for p, r in world.reports.items())
    reports = {p: r for p, r in found if r is not None}
    endpoints = source_replicas(world.source, world.live)
    previous = [e["pod"] for e in status.get("targets") or []]
    pods = members(world, previous, set(endpoints) | _source_pods(world.source))
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": PHASE,
        "startTime": status.get("startTime") or times.stamp(world.now),
    }
    if latest:
        out["version"] = latest
    if src_status.get("fingerprint"):
        out["fingerprint"] = src_status["fingerprint"]
    if not endpoints:
        links: list[Link] = []
        synced = Cond(
            "Synced",
            False,
            "SourceNotReady",
            f"WeightSource {spec.source_ref.name} has no ready replica to follow",
        )
    else:
        links = topology(spec.strategy.type, spec.strategy.max_fan_out, pods, sorted(endpoints))
        synced = _synced(links, reports, latest)
    entries = [
        entry(link, reports.get(link.pod), latest, link.pod in world.expired) for link in links
    ]
    done = sum(1 for e in entries if e["phase"] == "Done")
    out["targets"] = entries
    out["targetsSummary"] = f"{done}/{len(entries)}"
    out["bytesDone"] = min(sum(e.get("bytes", 0) for e in entries), leases.INT64_MAX)
    conds = [
        synced,
        Cond(
            "Progressing",
            True,
            "Following",
            f"{len(entries)} target(s) follow {spec.source_ref.name}",
        ),
        Cond(
            "Complete", False, "Following", "version: follow never completes; see condition Synced"
        ),
        Cond("Failed", False, "AsExpected", ""),
    ]
    out["conditions"] = set_conditions(status.get("conditions"), conds, generation, world.now)
    want = {link.pod: assignment(name, spec, link, endpoints, reports) for link in links}
    return Decision(RefitJobStatus.model_validate(out), want)


def _synced(links: list[Link], reports: Mapping[str, FollowReport], latest: str | None) -> Cond:
    if not links:
        return Cond("Synced", False, "NoTargets", "no selected target pod has a live agent")
    if not latest:
        return Cond("Synced", False, "NoVersion", "the source has not published a version yet")
    behind = [
        link.pod for link in links if getattr(reports.get(link.pod), "version", None) != latest
    ]
    if not behind:
        return Cond("Synced", True, "AllTargetsSynced", f"{len(links)} target(s) serve {latest}")
    return Cond(
        "Synced",
        False,
        "Behind",
        f"{len(behind)} of {len(links)} target(s) not on {latest}: {', '.join(behind[:5])}",
    )


def _source_pods(source: dict[str, Any] | None) -> set[str]:
    return {
        m["pod"] for m in ((source or {}).get("status") or {}).get("members") or [] if m.get("pod")
    }

"""Level-triggered reconcile adapters: read the world, compute status, apply it.

Every handler for a kind (create, update, resume, timer) calls the same
function here, so an edge only wakes the reconcile up; the outcome depends only
on what is read now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from ferry_api import leases, times
from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec
from ferry_api.refitjob import RefitJob, RefitJobSpec
from ferry_api.weightsource import WeightSource, WeightSourceSpec

from . import following, kube, metrics, wakeups
from .conditions import Cond, set_conditions, transitions
from .handlers import artifactcache, refit_transform, refitjob, weightsource

log = logging.getLogger(__name__)
JOB_CONDITIONS = ["Progressing", "Complete", "Failed"]
# The RefitJob each status write returned, (namespace, name) -> object: a report's
# wake-up reconciles from the newest body known (main._newest) without reading it again.
WRITTEN: dict[tuple[str, str], dict] = {}


@dataclass(frozen=True)
class Pods:
    """The pods a selector picks, read once: name -> node for those not being deleted,
    the names of those being deleted, and every one's labels."""

    nodes: dict[str, str | None]
    terminating: set[str]
    labels: dict[str, dict[str, str]]

    @property
    def names(self) -> list[str]:
        return sorted(self.nodes)


def _pods(namespace: str, selector: str) -> Pods:
    out = Pods({}, set(), {})
    for p in kube.list_pods(namespace, selector):
        name = p["metadata"]["name"]
        out.labels[name] = p["metadata"].get("labels") or {}
        if p["metadata"].get("deletionTimestamp"):
            out.terminating.add(name)
        else:
            out.nodes[name] = (p.get("spec") or {}).get("nodeName")
    return out


def _invalid(status: dict, generation: int, error: ValidationError, types: list[str]) -> dict:
    first = error.errors()[0]
    where = "spec." + ".".join(str(p) for p in first["loc"])
    msg = f"{where}: {first['msg']}"
    wanted = [Cond(t, False, "InvalidSpec", msg) for t in types]
    return {
        "observedGeneration": generation,
        "conditions": set_conditions(status.get("conditions"), wanted, generation, times.now()),
    }


def _spec(body: kopf.Body, spec_model: Any) -> Any:
    """The validated spec, or the ValidationError the CRD schema let slip past it."""
    try:
        return spec_model.model_validate(dict(body["spec"]))
    except ValidationError as exc:
        return exc


def _write(model: Any, body: kopf.Body, old: dict, new: dict, sole_writer: bool = False) -> None:
    """Apply `new` status. `sole_writer`: the operator writes every field of this kind's
    status, so an apply of what is already there changes nothing and is skipped (the
    timer reconciles a running job every second, and with 1,000 targets each no-op apply
    still costs the apiserver a full merge)."""
    meta = body["metadata"]
    if not sole_writer or new != old:
        out = kube.apply_status(model, meta["namespace"], meta["name"], new)
        if model is RefitJob:
            if len(WRITTEN) > 10_000:
                WRITTEN.clear()
            WRITTEN[(meta["namespace"], meta["name"])] = out


def _announce(model: Any, body: kopf.Body, old: dict, new: dict, logger: logging.Logger) -> None:
    """An Event and a metric per condition that changed."""
    for cond in transitions(old.get("conditions"), new["conditions"]):
        metrics.CONDITION_TRANSITIONS.labels(model.KIND, cond["type"], cond["status"]).inc()
        if cond["reason"] == "AsExpected" and not old.get("conditions"):
            continue  # a quiet start is not news
        warn = (cond["type"] in ("Degraded", "Failed") and cond["status"] == "True") or cond[
            "reason"
        ] in ("InvalidSpec", "SourceNotFound")
        kopf.event(
            body,
            type="Warning" if warn else "Normal",
            reason=cond["reason"],
            message=f"{cond['type']}={cond['status']}: {cond['message'] or cond['reason']}"[:1024],
        )
    meta = body["metadata"]
    logger.debug("reconciled %s %s/%s", model.KIND, meta["namespace"], meta["name"])


def _reconcile_status(
    kind: Any,
    spec_model: Any,
    types: list[str],
    body: kopf.Body,
    logger: logging.Logger,
    decide: Callable[[Any, str, str, dict, int], dict],
) -> None:
    """The reconcile of a kind whose status is one computation over what it reads:
    validate the spec (a bad one: every condition in `types` False, InvalidSpec),
    `decide(spec, namespace, name, old status, generation)` -> the new status (wire
    form), apply it, announce what changed."""
    meta, old = body["metadata"], dict(body.get("status") or {})
    generation = meta.get("generation", 0)
    with metrics.reconcile_timer(kind.KIND) as outcome:
        spec = _spec(body, spec_model)
        if isinstance(spec, ValidationError):
            outcome["result"] = "invalid"
            new = _invalid(old, generation, spec, types)
        else:
            new = decide(spec, meta["namespace"], meta["name"], old, generation)
        _write(kind, body, old, new)
    _announce(kind, body, old, new, logger)


def _weightsource(spec: WeightSourceSpec, ns: str, name: str, old: dict, generation: int) -> dict:
    pods = _pods(ns, spec.selector.to_label_selector()).names
    now = times.now()
    live = kube.live_agents(ns, now)
    stale = weightsource.stale_pods(weightsource.selected_members(old, pods, live))
    metrics.STALE_REPLICAS.labels(ns, name).set(len(stale))
    return weightsource.status_model(spec, old, generation, pods, now, live).wire()


def weightsource_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    _reconcile_status(
        WeightSource, WeightSourceSpec, ["Ready", "Degraded"], body, logger, _weightsource
    )


def _artifactcache(spec: ArtifactCacheSpec, ns: str, name: str, old: dict, generation: int) -> dict:
    sources = _pods(ns, spec.sources.to_label_selector()).names
    targets = [p for p in _pods(ns, spec.targets.to_label_selector()).names if p not in sources]
    now = times.now()
    live = kube.live_agents(ns, now)
    return artifactcache.compute_status(spec, old, generation, sources, targets, now, live).wire()


def artifactcache_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    _reconcile_status(
        ArtifactCache, ArtifactCacheSpec, ["Ready", "Degraded"], body, logger, _artifactcache
    )


@dataclass(frozen=True)
class JobRead:
    """What a RefitJob reconcile reads besides the job: its World and the agent Leases
    (whose assignments it then writes)."""

    world: refitjob.World
    agents: kube.AgentLeases


# A job's three reads go out together: each is a round trip to the apiserver, and a
# reconcile runs on a one-shot refit's path twice (assign, then fold the reports).
_READS = ThreadPoolExecutor(8, thread_name_prefix="ferry-read")


def _read_job(ns: str, uid: str, spec: RefitJobSpec) -> JobRead:
    now = times.now()
    leases_ = _READS.submit(kube.agent_leases, ns, now)
    source_ = _READS.submit(kube.get_object, WeightSource.PLURAL, ns, spec.source_ref.name)
    pods = _pods(ns, spec.targets.to_label_selector())
    agents, source = leases_.result(), source_.result()
    world = refitjob.World(
        source=source,
        targets=pods.nodes,
        live=agents.live,
        now=now,
        expired=agents.expired,
        # Target ranks (pod labels) matter only for a TP source or a reshard.
        labels={p: pods.labels[p] for p in pods.nodes}
        if refit_transform.needs_ranks(spec, source)
        else {},
        reports=_reports(agents, uid),
        terminating=pods.terminating,
        retry_at=agents.retry_at,
    )
    return JobRead(world, agents)


@dataclass(frozen=True)
class JobOutcome:
    """What a RefitJob reconcile decided: the decision, the status as it is applied (wire
    form) and every target's assignment as its Lease annotation (pod -> encoded)."""

    decision: refitjob.Decision
    status: dict[str, Any]
    assignments: dict[str, str]


def decide_job(
    name: str, spec: RefitJobSpec, old: dict, generation: int, world: refitjob.World
) -> JobOutcome:
    """The pure part of a RefitJob reconcile, between its reads and its writes (what
    `ferry bench reconcile` times)."""
    d = refitjob.compute_status(spec, old, generation, world)
    status = d.status
    return JobOutcome(
        d, status, leases.encode_assignments(refitjob.assignments(name, spec, status))
    )


def refitjob_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    meta, old = body["metadata"], dict(body.get("status") or {})
    ns, name, uid, generation = (
        meta["namespace"],
        meta["name"],
        meta["uid"],
        meta.get("generation", 0),
    )
    if meta.get("deletionTimestamp"):
        return
    if following.is_follow(body):  # version: follow is its own reconcile (following.py)
        following.reconcile(body, logger, lambda ns, sel: _pods(ns, sel).nodes)
        return
    with metrics.reconcile_timer(RefitJob.KIND) as outcome:
        spec = _spec(body, RefitJobSpec)
        if isinstance(spec, ValidationError):
            outcome["result"] = "invalid"
            _write(
                RefitJob,
                body,
                old,
                new := _invalid(old, generation, spec, JOB_CONDITIONS),
                sole_writer=True,
            )
            read = None
        else:
            read = _read_job(ns, uid, spec)
            job = decide_job(name, spec, old, generation, read.world)
            _write(RefitJob, body, old, new := job.status, sole_writer=True)
    _announce(RefitJob, body, old, new, logger)
    if read is None or isinstance(spec, ValidationError):
        return
    d = job.decision
    _assign(ns, uid, read.agents, job.assignments)
    if new["phase"] not in refitjob.TERMINAL and wakeups.idle_targets(
        set(read.world.targets), set(job.assignments), new, refitjob.SETTLED
    ):
        # Woken by the WeightSource's next change (a member serving the version), not the timer.
        rv = ((read.world.source or {}).get("metadata") or {}).get("resourceVersion")
        wakeups.SOURCES.wait(ns, spec.source_ref.name, name, uid, rv)
    metrics.observe_job_phase(uid, new["phase"])
    for pod, upstream in d.assigned.items():
        logger.info("assigned %s <- %s", pod, ",".join(upstream))
    if new["phase"] in refitjob.TERMINAL and old.get("phase") not in refitjob.TERMINAL:
        _count_finished(new, old)
    if d.delete:
        logger.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
        kube.delete_object(refitjob.PLURAL, ns, name)


def _reports(agents: kube.AgentLeases, uid: str) -> dict[str, leases.Report]:
    """pod -> its agent's report on job `uid`, from the Lease annotations (one that is
    not a report is left out)."""
    key = leases.REPORT + uid
    found = ((pod, leases.Report.decode(ann.get(key))) for pod, ann in agents.annotations.items())
    return {pod: r for pod, r in found if r is not None}


def _assign(
    namespace: str, uid: str, agents: kube.AgentLeases, want: dict[str, str | None]
) -> None:
    """Make the assignment annotation of job `uid` on every agent Lease equal `want`
    (pod -> encoded assignment; absent: none), writing only the Leases that differ.
    A pod without a Lease yet gets its assignment once its agent has started."""
    key = leases.ASSIGN + uid
    changes: dict[str, dict[str, str | None]] = {
        pod: {key: want.get(pod)}
        for pod, ann in agents.annotations.items()
        if ann.get(key) != want.get(pod)
    }
    if changes:
        started = time.monotonic()
        wrote = kube.annotate_leases(namespace, changes)
        log.info(
            "job %s: %d assignment change(s) written to agent Leases in %.2fs",
            uid,
            wrote,
            time.monotonic() - started,
        )


def _count_finished(status: dict, old: dict) -> None:
    for entry in old.get("targets") or []:
        outcome = entry.get("phase") or "Unknown"
        metrics.REFIT_TARGETS.labels(outcome, entry.get("reason") or "").inc()
    metrics.REFIT_BYTES.inc(status.get("bytesDone") or 0)
    start, end = (times.parse(status.get(k)) for k in ("startTime", "completionTime"))
    if start and end and end > start and status.get("bytesDone"):
        metrics.REFIT_JOB_THROUGHPUT.observe(
            status["bytesDone"] / (end - start).total_seconds() / 1e9
        )


def refitjob_deleted(body: kopf.Body, logger: logging.Logger, runtime: Any, **_: Any) -> None:
    """Finalizer: take every assignment of the job off the agents' Leases, so that their
    pulls cancel, and fold their last reports into the job (who cancelled, with how many
    bytes); release once none is pulling (or after 30 s, so a dead agent cannot pin it)."""
    meta = body["metadata"]
    if following.is_follow(body):
        following.deleted(body)
        return
    metrics.observe_job_phase(meta["uid"], None)
    status = dict(body.get("status") or {})
    if status.get("phase") in refitjob.TERMINAL:
        return  # its reconcile already took the assignments off
    agents = kube.agent_leases(meta["namespace"], times.now())
    _assign(meta["namespace"], meta["uid"], agents, {})
    entries, pulling = refitjob.fold_cancelled(status, _reports(agents, meta["uid"]), agents.live)
    folded = entries != (status.get("targets") or [])
    if folded:
        kube.apply_status(RefitJob, meta["namespace"], meta["name"], {**status, "targets": entries})
    # Released on a pass that found nothing new to fold, so the last reports are seen
    # on the job before it goes.
    if (folded or pulling) and runtime.total_seconds() < 30:
        raise kopf.TemporaryError(
            f"waiting for {len(pulling)} target(s) to cancel: {', '.join(pulling[:5])}", delay=1
        )
    if pulling:
        logger.warning("released %s with targets still pulling: %s", meta["name"], pulling)

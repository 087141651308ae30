"""Level-triggered reconcile adapters: read the world, compute status, apply it.

Every handler for a kind (create, update, resume, timer) calls the same
function here, so an edge only wakes the reconcile up; the outcome depends only
on what is read now.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from ferry_api import leases
from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec
from ferry_api.meta import now
from ferry_api.refitjob import RefitJob, RefitJobSpec
from ferry_api.weightsource import WeightSource, WeightSourceSpec

from . import kube, metrics
from .conditions import Cond, set_conditions, transitions
from .handlers import artifactcache, refit_transform, refitjob, weightsource

log = logging.getLogger(__name__)


def _pods(namespace: str, selector: str) -> dict[str, str | None]:
    """Selected pods that are not being deleted: name -> node."""
    return {p["metadata"]["name"]: p["spec"].get("nodeName") for p in kube.list_pods(namespace, selector)
            if not p["metadata"].get("deletionTimestamp")}


def _pod_labels(namespace: str, selector: str) -> dict[str, dict[str, str]]:
    """Selected pods' labels (name -> labels), read as plain JSON."""
    raw = kube.core().list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    return {p["metadata"]["name"]: p["metadata"].get("labels") or {} for p in json.loads(raw.data)["items"]}


def _pod_names(namespace: str, selector: str) -> list[str]:
    return sorted(_pods(namespace, selector))


def _invalid(status: dict, generation: int, error: ValidationError, types: list[str]) -> dict:
    first = error.errors()[0]
    where = "spec." + ".".join(str(p) for p in first["loc"])
    msg = f"{where}: {first['msg']}"
    wanted = [Cond(t, False, "InvalidSpec", msg) for t in types]
    return {"observedGeneration": generation,
            "conditions": set_conditions(status.get("conditions"), wanted, generation, now())}


def _run(model: Any, body: kopf.Body, logger: logging.Logger,
         compute: Callable[[Any, dict, int], dict], spec_model: type, cond_types: list[str],
         sole_writer: bool = False) -> None:
    """`sole_writer`: the operator writes every field of this kind's status, so an apply
    of what is already there changes nothing and is skipped (the timer reconciles a
    running job every second, and with 1,000 targets each no-op apply still costs the
    apiserver a full merge)."""
    kind = model.KIND
    meta, status = body["metadata"], dict(body.get("status") or {})
    generation = meta.get("generation", 0)
    with metrics.reconcile_timer(kind) as outcome:
        try:
            spec = spec_model.model_validate(dict(body["spec"]))
            new = compute(spec, status, generation)
        except ValidationError as exc:
            # The CRD schema rejects most bad input; this catches what slipped past it.
            outcome["result"] = "invalid"
            new = _invalid(status, generation, exc, cond_types)
        if not sole_writer or new != status:
            kube.apply_status(model, meta["namespace"], meta["name"], new)
    for cond in transitions(status.get("conditions"), new["conditions"]):
        metrics.CONDITION_TRANSITIONS.labels(kind, cond["type"], cond["status"]).inc()
        if cond["reason"] == "AsExpected" and not status.get("conditions"):
            continue  # a quiet start is not news
        warn = (cond["type"] in ("Degraded", "Failed") and cond["status"] == "True") or \
            cond["reason"] in ("InvalidSpec", "SourceNotFound")
        kopf.event(body, type="Warning" if warn else "Normal", reason=cond["reason"],
                   message=f"{cond['type']}={cond['status']}: {cond['message'] or cond['reason']}"[:1024])
    logger.debug("reconciled %s %s/%s", kind, meta["namespace"], meta["name"])


def weightsource_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    ns = body["metadata"]["namespace"]
    stale: list[str] = []

    def compute(spec: WeightSourceSpec, status: dict, generation: int) -> dict:
        pods = _pod_names(ns, spec.selector.to_label_selector())
        live = kube.live_agents(ns, now())
        stale.extend(weightsource.stale_pods(weightsource.selected_members(status, pods, live)))
        return weightsource.compute_status(spec, status, generation, pods, now(), live)

    _run(WeightSource, body, logger, compute, WeightSourceSpec,
         ["Ready", "Degraded"])
    metrics.STALE_REPLICAS.labels(ns, body["metadata"]["name"]).set(len(stale))


def refitjob_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    if meta.get("deletionTimestamp"):
        return
    old_status = dict(body.get("status") or {})
    decision: dict[str, refitjob.Decision] = {}
    seen: dict[str, kube.AgentLeases] = {}

    def compute(spec: RefitJobSpec, status: dict, generation: int) -> dict:
        agents = seen["leases"] = kube.agent_leases(ns, now())
        source = kube.get_object(WeightSource.PLURAL, ns, spec.source_ref.name)
        world = refitjob.World(
            source=source,
            targets=_pods(ns, spec.targets.to_label_selector()),
            live=agents.live,
            now=now(),
            expired=agents.expired,
            # Target ranks (pod labels) matter only for a TP source or a reshard.
            labels=_pod_labels(ns, spec.targets.to_label_selector())
            if refit_transform.needs_ranks(spec, source) else {},
            reports=_reports(agents, uid),
        )
        decision["d"] = refitjob.compute_status(spec, status, generation, world)
        return decision["d"].status

    _run(RefitJob, body, logger, compute, RefitJobSpec,
         ["Progressing", "Complete", "Failed"], sole_writer=True)
    d = decision.get("d")
    if d is None:
        return
    want = refitjob.assignments(name, dict(body["spec"]), d.status)
    _assign(ns, uid, seen["leases"], {pod: leases.encode(a) for pod, a in want.items()})
    metrics.observe_job_phase(uid, d.status["phase"])
    for pod, upstream in d.assigned.items():
        logger.info("assigned %s <- %s", pod, ",".join(upstream))
    if d.status["phase"] in refitjob.TERMINAL and old_status.get("phase") not in refitjob.TERMINAL:
        _count_finished(d.status, old_status)
    if d.delete:
        logger.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
        kube.delete_object(refitjob.PLURAL, ns, name)


def _reports(agents: kube.AgentLeases, uid: str) -> dict[str, dict]:
    """pod -> its agent's report on job `uid`, from the Lease annotations."""
    found = ((pod, leases.read(ann, leases.REPORT).get(uid)) for pod, ann in agents.annotations.items())
    return {pod: r for pod, r in found if r is not None}


def _assign(namespace: str, uid: str, agents: kube.AgentLeases, want: dict[str, str | None]) -> None:
    """Make the assignment annotation of job `uid` on every agent Lease equal `want`
    (pod -> encoded assignment; absent: none), writing only the Leases that differ.
    A pod without a Lease yet gets its assignment once its agent has started."""
    key = leases.ASSIGN + uid
    changes: dict[str, dict[str, str | None]] = {
        pod: {key: want.get(pod)} for pod, ann in agents.annotations.items() if ann.get(key) != want.get(pod)}
    if changes:
        started = time.monotonic()
        wrote = kube.annotate_leases(namespace, changes)
        log.info("job %s: %d assignment change(s) written to agent Leases in %.2fs", uid, wrote,
                 time.monotonic() - started)


def _count_finished(status: dict, old: dict) -> None:
    for entry in old.get("targets") or []:
        outcome = entry.get("phase") or "Unknown"
        metrics.REFIT_TARGETS.labels(outcome, entry.get("reason") or "").inc()
    metrics.REFIT_BYTES.inc(status.get("bytesDone") or 0)
    start, end = (refitjob.parse_time(status.get(k)) for k in ("startTime", "completionTime"))
    if start and end and end > start and status.get("bytesDone"):
        metrics.REFIT_JOB_THROUGHPUT.observe(status["bytesDone"] / (end - start).total_seconds() / 1e9)


def refitjob_deleted(body: kopf.Body, logger: logging.Logger, runtime: Any, **_: Any) -> None:
    """Finalizer: take every assignment of the job off the agents' Leases, so that their
    pulls cancel, and fold their last reports into the job (who cancelled, with how many
    bytes); release once none is pulling (or after 30 s, so a dead agent cannot pin it)."""
    meta = body["metadata"]
    metrics.observe_job_phase(meta["uid"], None)
    status = dict(body.get("status") or {})
    if status.get("phase") in refitjob.TERMINAL:
        return  # its reconcile already took the assignments off
    agents = kube.agent_leases(meta["namespace"], now())
    _assign(meta["namespace"], meta["uid"], agents, {})
    reports = _reports(agents, meta["uid"])
    entries = [refitjob.fold(e, reports.get(e["pod"])) for e in status.get("targets") or []]
    folded = entries != (status.get("targets") or [])
    if folded:
        kube.apply_status(RefitJob, meta["namespace"], meta["name"], {**status, "targets": entries})
    pulling = [e["pod"] for e in entries if e["pod"] in agents.live
               and refitjob.target_phase(e, 1 << 30) == "Pulling"]
    # Released on a pass that found nothing new to fold, so the last reports are seen
    # on the job before it goes.
    if (folded or pulling) and runtime.total_seconds() < 30:
        raise kopf.TemporaryError(f"waiting for {len(pulling)} target(s) to cancel: {', '.join(pulling[:5])}",
                                  delay=1)
    if pulling:
        logger.warning("released %s with targets still pulling: %s", meta["name"], pulling)


def artifactcache_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    ns = body["metadata"]["namespace"]

    def compute(spec: ArtifactCacheSpec, status: dict, generation: int) -> dict:
        sources = _pod_names(ns, spec.sources.to_label_selector())
        targets = [p for p in _pod_names(ns, spec.targets.to_label_selector()) if p not in sources]
        live = kube.live_agents(ns, now())
        return artifactcache.compute_status(spec, status, generation, sources, targets, now(), live)

    _run(ArtifactCache, body, logger, compute, ArtifactCacheSpec,
         ["Ready", "Degraded"])

"""Level-triggered reconcile adapters: read the world, compute status, apply it.

Every handler for a kind (create, update, resume, timer) calls the same
function here, so an edge only wakes the reconcile up; the outcome depends only
on what is read now.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from ferry_api.artifactcache import ArtifactCache, ArtifactCacheSpec
from ferry_api.meta import now
from ferry_api.refitjob import RefitJob, RefitJobSpec
from ferry_api.weightsource import WeightSource, WeightSourceSpec

from . import kube, metrics
from .conditions import Cond, set_conditions, transitions
from .handlers import artifactcache, refit_transform, refitjob, weightsource


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


def _unchanged(new: dict, status: dict, entries: str) -> bool:
    """Whether applying `new` would change nothing: every top-level field equal, and
    every field of every `entries` item (list-map keyed by pod) already there. The
    operator's own fields of an entry only ever grow, so nothing would be removed either."""
    if {k for k in status if k != entries} != {k for k in new if k != entries}:
        return False
    if any(status[k] != v for k, v in new.items() if k != entries):
        return False
    have = {e.get("pod"): e for e in status.get(entries) or []}
    return all(have.get(e["pod"], {}).get(f) == v for e in new.get(entries) or [] for f, v in e.items())


def _run(model: Any, body: kopf.Body, logger: logging.Logger,
         compute: Callable[[Any, dict, int], dict], spec_model: type, cond_types: list[str],
         entries: str | None = None) -> None:
    """`entries`: a status list-map the operator shares with agents; when set, an apply
    that would change nothing is skipped (the timer reconciles a running job every second,
    and with 1,000 targets each no-op apply still costs the apiserver a full merge)."""
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
        if entries is None or not _unchanged(new, status, entries):
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
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    old_status = dict(body.get("status") or {})
    decision: dict[str, refitjob.Decision] = {}

    def compute(spec: RefitJobSpec, status: dict, generation: int) -> dict:
        live, expired = kube.agent_leases(ns, now())
        source = kube.get_object(WeightSource.PLURAL, ns, spec.source_ref.name)
        world = refitjob.World(
            source=source,
            targets=_pods(ns, spec.targets.to_label_selector()),
            live=live,
            now=now(),
            expired=expired,
            # Target ranks (pod labels) matter only for a TP source or a reshard.
            labels=_pod_labels(ns, spec.targets.to_label_selector())
            if refit_transform.needs_ranks(spec, source) else {},
        )
        decision["d"] = refitjob.compute_status(spec, status, generation, world)
        return decision["d"].status

    _run(RefitJob, body, logger, compute, RefitJobSpec,
         ["Progressing", "Complete", "Failed"], entries="targets")
    d = decision.get("d")
    if d is None:
        return
    metrics.observe_job_phase(meta["uid"], d.status["phase"])
    for pod, upstream in d.assigned.items():
        logger.info("assigned %s <- %s", pod, ",".join(upstream))
    if d.status["phase"] in refitjob.TERMINAL and old_status.get("phase") not in refitjob.TERMINAL:
        _count_finished(d.status, old_status)
    if d.delete:
        logger.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
        kube.delete_object(refitjob.PLURAL, ns, name)


def _count_finished(status: dict, old: dict) -> None:
    for entry in old.get("targets") or []:
        outcome = entry.get("phase") or "Unknown"
        metrics.REFIT_TARGETS.labels(outcome, entry.get("reason") or "").inc()
    metrics.REFIT_BYTES.inc(status.get("bytesDone") or 0)
    start, end = (refitjob.parse_time(status.get(k)) for k in ("startTime", "completionTime"))
    if start and end and end > start and status.get("bytesDone"):
        metrics.REFIT_JOB_THROUGHPUT.observe(status["bytesDone"] / (end - start).total_seconds() / 1e9)


def refitjob_deleted(body: kopf.Body, logger: logging.Logger, runtime: Any, **_: Any) -> None:
    """Finalizer: a running job's targets see the deletion and cancel their pulls;
    release once none is pulling (or after 30 s, so a dead agent cannot pin it)."""
    metrics.observe_job_phase(body["metadata"]["uid"], None)
    status = body.get("status") or {}
    if status.get("phase") in refitjob.TERMINAL:
        return
    # An unlimited backoff: here only "is an attempt in hand" matters, not retries.
    pulling = [e["pod"] for e in status.get("targets") or []
               if refitjob.target_phase(e, 1 << 30) in ("Assigned", "Pulling")]
    if pulling and runtime.total_seconds() < 30:
        raise kopf.TemporaryError(f"waiting for {len(pulling)} target(s) to cancel: {', '.join(pulling[:5])}",
                                  delay=1)
    if pulling:
        logger.warning("released %s with targets still pulling: %s", body["metadata"]["name"], pulling)


def artifactcache_(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    ns = body["metadata"]["namespace"]

    def compute(spec: ArtifactCacheSpec, status: dict, generation: int) -> dict:
        sources = _pod_names(ns, spec.sources.to_label_selector())
        targets = [p for p in _pod_names(ns, spec.targets.to_label_selector()) if p not in sources]
        live = kube.live_agents(ns, now())
        return artifactcache.compute_status(spec, status, generation, sources, targets, now(), live)

    _run(ArtifactCache, body, logger, compute, ArtifactCacheSpec,
         ["Ready", "Degraded"])

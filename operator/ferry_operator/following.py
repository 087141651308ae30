"""Reconcile adapter of RefitJob `version: follow` (decisions: handlers/follow.py).

Reads the source, the target pods and the agent Leases; applies the status; writes
each target's follow assignment onto its agent's Lease (`follow.ferry.dev/<uid>`),
touching only the Leases whose assignment changed. Called from reconcile.refitjob_ and
refitjob_deleted for follow jobs only, so the one-shot logic never sees them.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import ValidationError

from ferry_api import leases
from ferry_api.meta import now
from ferry_api.refitjob import FOLLOW, RefitJob, RefitJobSpec
from ferry_api.weightsource import WeightSource

from . import kube
from .handlers import follow

log = logging.getLogger(__name__)


def is_follow(body: kopf.Body) -> bool:
    return (body.get("spec") or {}).get("version") == FOLLOW


def reconcile(body: kopf.Body, logger: logging.Logger, pods: Any) -> None:
    """`pods(namespace, selector)`: selected pods not being deleted, name -> node."""
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    status = dict(body.get("status") or {})
    try:
        spec = RefitJobSpec.model_validate(dict(body["spec"]))
    except ValidationError as exc:  # the CRD refuses most; say which field slipped past
        logger.warning("follow job %s/%s: invalid spec: %s", ns, name, exc.errors()[0]["msg"])
        return
    agents = kube.agent_leases(ns, now())
    world = follow.World(
        source=kube.get_object(WeightSource.PLURAL, ns, spec.source_ref.name),
        targets=pods(ns, spec.targets.to_label_selector()),
        live=agents.live,
        now=now(),
        reports=_reports(agents, uid),
        expired=agents.expired,
    )
    d = follow.compute(name, spec, status, meta.get("generation", 0), world)
    new = d.status  # wire form, once
    if new != status:
        kube.apply_status(RefitJob, ns, name, new)
    assign(ns, uid, agents, {p: a.encode() for p, a in d.assignments.items()})


def deleted(body: kopf.Body) -> None:
    """Take the job's follow assignments off every Lease: the followers stop."""
    meta = body["metadata"]
    agents = kube.agent_leases(meta["namespace"], now())
    assign(meta["namespace"], meta["uid"], agents, {})


def _reports(agents: kube.AgentLeases, uid: str) -> dict[str, leases.FollowReport]:
    found = (
        (pod, leases.FollowReport.parse(leases.read(ann, leases.FOLLOW_REPORT).get(uid)))
        for pod, ann in agents.annotations.items()
    )
    return {pod: r for pod, r in found if r is not None}


def assign(namespace: str, uid: str, agents: kube.AgentLeases, want: dict[str, str]) -> None:
    key = leases.FOLLOW + uid
    changes: dict[str, dict[str, str | None]] = {
        pod: {key: want.get(pod)}
        for pod, ann in agents.annotations.items()
        if ann.get(key) != want.get(pod)
    }
    if changes:
        wrote = kube.annotate_leases(namespace, changes)
        log.info(
            "follow job %s: %d follow assignment change(s) written (%s)",
            uid,
            wrote,
            ", ".join(f"{p} {'set' if c[key] else 'removed'}" for p, c in sorted(changes.items())),
        )

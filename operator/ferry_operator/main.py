"""Every kopf registration of the operator, on one screen. The work lives in reconcile.py."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from ferry_api import GROUP, VERSION

from . import diffbase, health, injection, metrics, reconcile
from .handlers.refitjob import TERMINAL

RESYNC_SECONDS = float(os.environ.get("FERRY_RESYNC_SECONDS", "30"))
# Running RefitJobs are re-checked every second: agents report into status and
# wait for the next assignment.
JOB_CHECK_SECONDS = float(os.environ.get("FERRY_JOB_CHECK_SECONDS", "1"))
# WeightSources are re-checked faster than the resync: an agent whose Lease
# expired must show Stale within one lease duration (15 s by default, 3 s at least).
LEASE_CHECK_SECONDS = min(RESYNC_SECONDS, float(os.environ.get("FERRY_LEASE_CHECK_SECONDS", "2")))
HEALTH_PORT = int(os.environ.get("FERRY_HEALTH_PORT", "8080"))
CANARY_SECONDS = float(os.environ.get("FERRY_CANARY_SECONDS", "10"))
PEERING = os.environ.get("FERRY_PEERING", "")
PRIORITY = int(os.environ.get("FERRY_PRIORITY", "0"))
WEBHOOK_PORT = int(os.environ.get("FERRY_WEBHOOK_PORT", "0"))  # 0: no webhook server
WEBHOOK_HOST = os.environ.get("FERRY_WEBHOOK_HOST", "")  # the name the apiserver dials
WEBHOOK_CERT_DIR = os.environ.get("FERRY_WEBHOOK_CERT_DIR", "")
INJECT = injection.InjectSettings.from_env()
WATCH_SERVER_TIMEOUT = int(float(os.environ.get("FERRY_WATCH_SERVER_TIMEOUT", "60")))

HEALTH = health.WatchHealth(interval=CANARY_SECONDS)
_STOP = asyncio.Event()
_TASKS: list[Any] = []


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Explicit watch timeouts: the server ends each watch, and the client gives up
    # shortly after, so a half-open connection cannot hang a watch forever.
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_SERVER_TIMEOUT + 10
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    # Keep kopf's bookkeeping in ferry.dev annotations, never in .status (the
    # schema prunes unknown status fields).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = diffbase.SlimDiffBase(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    # Every handler is the same idempotent reconcile: one that failed (e.g. while the
    # apiserver restarts) runs again in seconds, not after kopf's default of 60 s,
    # which would stall a running job's progress timer for a minute.
    settings.execution.default_backoff = 2
    # A timer caught mid-run when its object is deleted (its reconcile runs in a thread
    # and cannot be cancelled) holds the finalizer until kopf sees it exit: look every
    # second (a reconcile takes well under one), not kopf's default of every 60 s.
    settings.background.cancellation_polling = 1
    settings.execution.max_workers = 16
    if WEBHOOK_PORT:
        from . import webhook

        settings.admission.server = webhook.server(WEBHOOK_PORT, WEBHOOK_HOST, WEBHOOK_CERT_DIR)
        settings.admission.managed = GROUP
    _TASKS.append(await health.serve(HEALTH, HEALTH_PORT))
    _TASKS.append(asyncio.create_task(health.keep_canary(HEALTH, _STOP), name="ferry canary"))
    if PEERING:
        _TASKS.append(asyncio.create_task(health.watch_peering(HEALTH, PEERING, PRIORITY, _STOP),
                                          name="ferry peering"))
    HEALTH.ready = True


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    _STOP.set()
    await asyncio.to_thread(health.delete_canary)
    for item in _TASKS:
        if hasattr(item, "cleanup"):
            await item.cleanup()


@kopf.on.event("coordination.k8s.io", "v1", "leases",
               labels={health.CANARY_LABEL: health.CANARY_VALUE})
def canary_seen(name: str, **_: Any) -> None:
    if name == health.canary_name():
        HEALTH.seen()


def _ttl_pending(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """A finished RefitJob is frozen: its resync only has work when ttlSecondsAfterFinished
    must delete it (a running one has the progress timer). Without this, every finished
    job kept reconciling, which starved the operator with hundreds of jobs."""
    return status.get("phase") in TERMINAL and spec.get("ttlSecondsAfterFinished") is not None


for _plural, _fn in (
    ("weightsources", reconcile.weightsource_),
    ("refitjobs", reconcile.refitjob_),
    ("artifactcaches", reconcile.artifactcache_),
):
    kopf.on.create(GROUP, VERSION, _plural, id="reconcile")(_fn)
    kopf.on.update(GROUP, VERSION, _plural, id="reconcile")(_fn)
    kopf.on.resume(GROUP, VERSION, _plural, id="reconcile")(_fn)
    _every = LEASE_CHECK_SECONDS if _plural == "weightsources" else RESYNC_SECONDS
    kopf.timer(GROUP, VERSION, _plural, id="resync", interval=_every, initial_delay=_every,
               when=_ttl_pending if _plural == "refitjobs" else None)(_fn)


if WEBHOOK_PORT:
    @kopf.on.mutate("v1", "pods", id="inject-agent", operations=["CREATE"],
                    labels={injection.INJECT_LABEL: "true"},
                    ignore_failures=INJECT.failure_policy == "Ignore")
    def inject_agent(spec: kopf.Spec, patch: kopf.Patch, labels: kopf.Labels, namespace: str | None,
                     **_: Any) -> None:
        from ferry_api.meta import selector_matches

        from . import kube

        caches = kube.list_objects("artifactcaches", namespace) if namespace else []
        trust = injection.trust_mounts(dict(labels), caches, selector_matches)
        sources = kube.list_objects("weightsources", namespace) if namespace else []
        rank_label = injection.rank_label(dict(labels), sources, selector_matches)
        new = injection.inject(dict(spec), INJECT, trust, rank_label)
        if new is not None:
            for key in ("initContainers", "containers", "volumes"):
                patch.spec[key] = new[key]


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


kopf.timer(GROUP, VERSION, "refitjobs", id="progress", interval=JOB_CHECK_SECONDS,
           when=_running)(reconcile.refitjob_)
kopf.on.delete(GROUP, VERSION, "refitjobs", id="cancel")(reconcile.refitjob_deleted)


@kopf.on.delete(GROUP, VERSION, "weightsources", id="forget", optional=True)
def forget_weightsource(namespace: str, name: str, **_: Any) -> None:
    """No finalizer (optional): only drop the deleted source's gauge series."""
    try:
        metrics.STALE_REPLICAS.remove(namespace, name)
    except KeyError:
        pass

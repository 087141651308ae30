"""Every kopf registration of the operator, on one screen. The work lives in reconcile.py."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from typing import Any

import kopf

from ferry_api import GROUP, VERSION
from ferry_api.refitjob import RefitJob

from . import diffbase, following, health, injection, kube, metrics, reconcile, signer, wakeups
from .handlers.refitjob import TERMINAL

WAITING_FOR_CA = "the webhook's caBundle is not yet in its configuration"
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
# The MutatingWebhookConfiguration kopf keeps; another name lets a second operator
# (a test's) run beside one already serving ferry.dev.
WEBHOOK_CONFIGURATION = os.environ.get("FERRY_WEBHOOK_CONFIGURATION", GROUP)
# Who writes that configuration: kopf ("managed"), the chart with our caBundle
# ("ca-bundle"), or the chart with cert-manager's ("external"); webhook.CONFIG_MODES.
WEBHOOK_CONFIG = os.environ.get("FERRY_WEBHOOK_CONFIG", "managed")
# The namespaced install: no cluster-wide scanning of CRDs and namespaces (no such rights).
SCANNING = os.environ.get("FERRY_SCANNING", "on") != "off"
INJECT = injection.InjectSettings.from_env()
WATCH_SERVER_TIMEOUT = int(float(os.environ.get("FERRY_WATCH_SERVER_TIMEOUT", "60")))
# The namespaces the operator serves (`--namespace`, comma-separated); empty: all.
NAMESPACES = [n for n in os.environ.get("FERRY_NAMESPACES", "").split(",") if n]

FINALIZER = f"{GROUP}/finalizer"

HEALTH = health.WatchHealth(interval=CANARY_SECONDS)
_STOP = asyncio.Event()
_TASKS: list[Any] = []
_LEASES: list[wakeups.AgentLeaseWatch] = []


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Explicit watch timeouts: the server ends each watch, and the client gives up
    # shortly after, so a half-open connection cannot hang a watch forever.
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_SERVER_TIMEOUT + 10
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    # The only Lease handler is the canary's. kopf's `labels=` filters in the client,
    # so without a selector on the watch itself every Lease in the cluster (each node's
    # heartbeat every 10 s) streamed to the operator to be dropped.
    settings.watching.label_selectors["coordination.k8s.io", "leases"] = (
        f"{health.CANARY_LABEL}={health.CANARY_VALUE}"
    )
    # Keep kopf's bookkeeping in ferry.dev annotations, never in .status (the
    # schema prunes unknown status fields).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = diffbase.SlimDiffBase(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
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
    settings.scanning.disabled = not SCANNING
    if WEBHOOK_PORT:
        from . import webhook

        def ca_bundle(bundle: str) -> None:
            webhook.patch_ca_bundle(WEBHOOK_CONFIGURATION, bundle)
            HEALTH.pending.discard(WAITING_FOR_CA)

        if WEBHOOK_CONFIG == "ca-bundle":
            HEALTH.pending.add(WAITING_FOR_CA)

        settings.admission.server = webhook.server(
            WEBHOOK_PORT,
            WEBHOOK_HOST,
            WEBHOOK_CERT_DIR,
            health.canary_namespace(),
            on_bundle=ca_bundle if WEBHOOK_CONFIG == "ca-bundle" else None,
        )
        if WEBHOOK_CONFIG == "managed":
            settings.admission.managed = WEBHOOK_CONFIGURATION
    _LEASES.append(
        wakeups.AgentLeaseWatch(kube.api, _WAKEUPS.seen, NAMESPACES, WATCH_SERVER_TIMEOUT).start()
    )
    _TASKS.append(await health.serve(HEALTH, HEALTH_PORT))
    _TASKS.append(asyncio.create_task(health.keep_canary(HEALTH, _STOP), name="ferry canary"))
    if PEERING:
        _TASKS.append(
            asyncio.create_task(
                health.watch_peering(HEALTH, PEERING, PRIORITY, _STOP), name="ferry peering"
            )
        )
    HEALTH.ready = True


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    _STOP.set()
    for watch in _LEASES:
        watch.stop()
    _WAKEUPS.close()
    await asyncio.to_thread(health.delete_canary)
    for item in _TASKS:
        if hasattr(item, "cleanup"):
            await item.cleanup()


@kopf.on.event(
    "coordination.k8s.io", "v1", "leases", labels={health.CANARY_LABEL: health.CANARY_VALUE}
)
def canary_seen(name: str, **_: Any) -> None:
    if name == health.canary_name():
        HEALTH.seen()


# The context of a kopf handler that ran (its settings and event queue): a wake-up
# runs outside kopf, and kopf.event (the job's condition Events) needs them.
_KOPF_CONTEXT: list[contextvars.Context] = []


_JOB_LOCKS = [threading.Lock() for _ in range(64)]  # one reconcile of a job at a time


def _serialized(namespace: str, name: str, body: Any, logger: logging.Logger) -> None:
    """Reconcile one job at a time (kopf's handlers, its timer, the wake-ups), from the
    newest body known: a reconcile from a stale body (kopf's, from before another
    reconcile's write) could write Running over the Succeeded just written."""
    with _JOB_LOCKS[hash((namespace, name)) % len(_JOB_LOCKS)]:
        known = _newest((namespace, name))
        meta = body["metadata"]
        if (
            known is not None
            and known["metadata"].get("uid") == meta.get("uid")
            and wakeups.newer(known["metadata"].get("resourceVersion"), meta.get("resourceVersion"))
        ):
            body = known
        reconcile.refitjob_(body, logger)


def _refitjob(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    if not _KOPF_CONTEXT:
        _KOPF_CONTEXT.append(contextvars.copy_context())
    meta = body["metadata"]
    _serialized(meta["namespace"], meta["name"], body, logger)


def _reconcile_job(key: wakeups.JobKey) -> None:
    if not _KOPF_CONTEXT:
        return  # no kopf handler ran yet: the resume handlers reconcile every job at start
    namespace, name, uid = key
    body = _newest((namespace, name))
    if body is None or body["metadata"].get("uid") != uid:  # unknown, or another job of that name
        body = kube.get_object(RefitJob.PLURAL, namespace, name)
    if (
        body is not None
        and body["metadata"].get("uid") == uid
        and (body.get("status") or {}).get("phase") not in TERMINAL
    ):
        _KOPF_CONTEXT[0].copy().run(
            _serialized, namespace, name, body, logging.getLogger("ferry_operator.wakeups")
        )


_SEEN_JOBS: dict[tuple[str, str], dict] = {}  # the newest RefitJob from each watch event


def _newest(key: tuple[str, str]) -> dict | None:
    """The newest body of job `key` this operator knows, from its watch events and its
    own status writes (the operator alone writes the status), or None."""
    best = None
    for body in (_SEEN_JOBS.get(key), reconcile.WRITTEN.get(key)):
        rv = (body or {}).get("metadata", {}).get("resourceVersion")
        if body is not None and (
            best is None or wakeups.newer(rv, best["metadata"].get("resourceVersion"))
        ):
            best = body
    return best


# A target's final report finishes its job now, not at the next progress timer: the
# operator's own watch of the agent Leases (kopf's Lease watch carries the canary's
# label selector alone, so agent Lease events never reach a kopf handler).
_WAKEUPS = wakeups.ReportWakeups(_reconcile_job)
wakeups.SOURCES.wake = _WAKEUPS.wake


@kopf.on.event(GROUP, VERSION, "weightsources")
async def source_changed(
    body: kopf.Body, namespace: str, name: str, type: str | None, **_: Any
) -> None:
    """A job waiting for its source to serve the version runs when the WeightSource changes."""
    if type == "DELETED":
        wakeups.SOURCES.forget(namespace, name)
    else:
        wakeups.SOURCES.changed(namespace, name, body["metadata"].get("resourceVersion"))


@kopf.on.event(GROUP, VERSION, "refitjobs")
def job_added(
    body: kopf.Body,
    event: dict[str, Any],
    type: str | None,
    namespace: str,
    name: str,
    logger: logging.Logger,
    **_: Any,
) -> None:
    """A new one-shot RefitJob is reconciled (assigned) on its ADDED event: kopf's create
    handler runs only once the event of kopf's finalizer patch is back, a round trip and
    a watch event later on a one-shot refit's path. The finalizer goes on first (the
    deletion handler must see every job that assigned anything); kopf's create handler
    then finds nothing left to do. Every event's body is kept for the wake-ups."""
    meta = body["metadata"]
    key = (namespace, name)
    if type == "DELETED":
        _SEEN_JOBS.pop(key, None)
        reconcile.WRITTEN.pop(key, None)
        return
    if len(_SEEN_JOBS) > 10_000:
        _SEEN_JOBS.clear()
    _SEEN_JOBS[key] = event["object"]
    if (
        type != "ADDED"
        or body.get("status")
        or meta.get("deletionTimestamp")
        or following.is_follow(body)
    ):
        return
    fresh: dict[str, Any] = dict(body)
    if FINALIZER not in (meta.get("finalizers") or []):
        try:
            fresh = kube.add_finalizer(
                RefitJob.PLURAL,
                namespace,
                name,
                FINALIZER,
                list(meta.get("finalizers") or []),
                meta["resourceVersion"],
            )
        except kube.Conflict:
            return  # changed or gone meanwhile: kopf's own handlers take it
    _refitjob(body=fresh, logger=logger)


def _ttl_pending(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """A finished RefitJob is frozen: its resync only has work when ttlSecondsAfterFinished
    must delete it (a running one has the progress timer). Without this, every finished
    job kept reconciling, which starved the operator with hundreds of jobs."""
    return status.get("phase") in TERMINAL and spec.get("ttlSecondsAfterFinished") is not None


for _plural, _fn in (
    ("weightsources", reconcile.weightsource_),
    ("refitjobs", _refitjob),
    ("artifactcaches", reconcile.artifactcache_),
):
    kopf.on.create(GROUP, VERSION, _plural, id="reconcile")(_fn)
    kopf.on.update(GROUP, VERSION, _plural, id="reconcile")(_fn)
    kopf.on.resume(GROUP, VERSION, _plural, id="reconcile")(_fn)
    _every = LEASE_CHECK_SECONDS if _plural == "weightsources" else RESYNC_SECONDS
    kopf.timer(
        GROUP,
        VERSION,
        _plural,
        id="resync",
        interval=_every,
        initial_delay=_every,
        when=_ttl_pending if _plural == "refitjobs" else None,
    )(_fn)


if WEBHOOK_PORT:

    @kopf.on.mutate(
        "v1",
        "pods",
        id="inject-agent",
        operations=["CREATE"],  # id: webhook.HANDLER_ID
        labels={injection.INJECT_LABEL: "true"},
        ignore_failures=INJECT.failure_policy == "Ignore",
        # Kept when this replica exits: the others still serve it, and with
        # failurePolicy Fail a pod must be refused, not started without the agent,
        # while no operator runs.
        persistent=True,
    )
    def inject_agent(
        spec: kopf.Spec, patch: kopf.Patch, labels: kopf.Labels, namespace: str | None, **_: Any
    ) -> None:
        from ferry_api.meta import selector_matches

        from . import kube

        caches = kube.list_objects("artifactcaches", namespace) if namespace else []
        trust = injection.trust_mounts(dict(labels), caches, selector_matches)
        sources = kube.list_objects("weightsources", namespace) if namespace else []
        rank_label = injection.rank_label(dict(labels), sources, selector_matches)
        new = injection.inject(dict(spec), INJECT, trust, rank_label)
        if new is not None:
            for key in ("initContainers", "containers", "volumes", "automountServiceAccountToken"):
                patch.spec[key] = new[key]


_AGENT_CA = signer.AgentCA(health.canary_namespace())


@kopf.on.event(
    "certificates.k8s.io",
    "v1",
    "certificatesigningrequests",
    when=lambda spec, **_: spec.get("signerName") == signer.SIGNER,
)
def sign_agent_certificate(body: kopf.Body, **_: Any) -> None:
    """Signer ferry.dev/agent: a pod's own certificate (signer.py). An event handler:
    nothing is written to the CSR but its approval and certificate."""
    signer.handle(dict(body), _AGENT_CA)


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


# initial_delay: a new job's create handler (or job_added) runs first; the timer at once
# beside it doubled the first reconcile's reads and writes on the refit's path.
kopf.timer(
    GROUP,
    VERSION,
    "refitjobs",
    id="progress",
    interval=JOB_CHECK_SECONDS,
    initial_delay=JOB_CHECK_SECONDS,
    when=_running,
)(_refitjob)
kopf.on.delete(GROUP, VERSION, "refitjobs", id="cancel")(reconcile.refitjob_deleted)


@kopf.on.delete(GROUP, VERSION, "weightsources", id="forget", optional=True)
def forget_weightsource(namespace: str, name: str, **_: Any) -> None:
    """No finalizer (optional): only drop the deleted source's gauge series."""
    try:
        metrics.STALE_REPLICAS.remove(namespace, name)
    except KeyError:
        pass

"""Liveness that notices dead watches, readiness, and /metrics.

Two checks make /healthz fail:
- a kopf watcher task for one of Ferry's kinds is missing or finished;
- the canary: the operator renews its own Lease every `interval` seconds and
  must see that renewal come back through a kopf watch; if nothing arrives for
  `3 * interval + grace`, the watch pipeline (connection, auth, stream) is dead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web
from kubernetes import client
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ferry_api import ssa, times

from . import kube, metrics

log = logging.getLogger(__name__)
CANARY_LABEL = "ferry.dev/role"
CANARY_VALUE = "operator-canary"
WATCHED_PLURALS = ("weightsources", "refitjobs", "artifactcaches")


@dataclass
class WatchHealth:
    interval: float = 10.0
    grace: float = 5.0
    started: float = field(default_factory=time.monotonic)
    last_seen: float | None = None
    ready: bool = False  # started up
    # What readiness still waits for after start-up, e.g. the webhook's caBundle in the
    # chart's configuration (ca-bundle mode): ready before it, a pod created at once
    # after `helm install --wait` gets no sidecar (the apiserver cannot call us yet).
    pending: set[str] = field(default_factory=set)
    standby: bool = False  # kopf peering paused us in favour of a higher-priority peer

    def not_ready(self) -> list[str]:
        """Why /readyz is 503 (empty when ready)."""
        return sorted(self.pending) if self.ready else ["starting"]

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    def problems(self, task_names: list[str], now: float | None = None) -> list[str]:
        """Why the operator is not live (empty when it is). Pure over its inputs."""
        now = time.monotonic() if now is None else now
        if self.standby:
            # A paused standby watches nothing on purpose; it is live as long as
            # it answers. Restarting it would only churn the peering.
            self.started, self.last_seen = now, now
            return []
        out = []
        for plural in WATCHED_PLURALS:
            if not any(n.startswith("watcher for ") and plural in n for n in task_names):
                out.append(f"no live watch for {plural}")
        limit = 3 * self.interval + self.grace
        reference = self.last_seen if self.last_seen is not None else self.started
        age = now - reference
        metrics.WATCH_CANARY_AGE.set(age)
        if age > limit:
            out.append(
                f"canary lease not seen through the watch for {age:.0f}s (limit {limit:.0f}s)"
            )
        return out


def _live_task_names() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if not t.done()]


async def serve(health: WatchHealth, port: int) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        problems = health.problems(_live_task_names())
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        waiting = health.not_ready()
        if waiting:
            return web.Response(status=503, text="\n".join(waiting) + "\n")
        return web.Response(text="ok\n")

    async def metrics_(_: web.Request) -> web.Response:
        health.problems(_live_task_names())  # refresh the canary gauge
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def canary_name() -> str:
    ident = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    return f"ferry-operator-canary-{ident}"[:253].lower()


def canary_namespace() -> str:
    return os.environ.get("POD_NAMESPACE", "default")


def renew_canary(name: str, namespace: str) -> None:
    coord = client.CoordinationV1Api(kube.api())
    now = dt.datetime.now(dt.UTC)
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace, "labels": {CANARY_LABEL: CANARY_VALUE}},
        "spec": {
            "holderIdentity": name,
            "renewTime": times.stamp(now, micro=True),
            "leaseDurationSeconds": 60,
        },
    }
    coord.patch_namespaced_lease(
        name, namespace, body, field_manager="ferry-operator", force=True, _content_type=ssa.APPLY
    )


async def keep_canary(health: WatchHealth, stopped: asyncio.Event) -> None:
    name, namespace = canary_name(), canary_namespace()
    while not stopped.is_set():
        try:
            await asyncio.to_thread(renew_canary, name, namespace)
        except Exception as exc:  # the probe will report the consequence
            log.warning("could not renew canary lease %s/%s: %s", namespace, name, exc)
        try:
            await asyncio.wait_for(stopped.wait(), timeout=health.interval)
        except TimeoutError:
            pass


def delete_canary() -> None:
    try:
        client.CoordinationV1Api(kube.api()).delete_namespaced_lease(
            canary_name(), canary_namespace()
        )
    except Exception as exc:
        log.info("canary lease not deleted: %s", exc)


def outranked(peers: dict[str, dict], priority: int, now: dt.datetime) -> bool:
    """True when a live peer in a kopf peering object's status has a higher priority."""
    for info in peers.values():
        if not isinstance(info, dict) or "priority" not in info:
            continue
        seen = times.parse(info.get("lastseen"))
        alive = (
            seen is not None and seen + dt.timedelta(seconds=int(info.get("lifetime", 60))) > now
        )
        if alive and int(info["priority"]) > priority:
            return True
    return False


async def watch_peering(
    health: WatchHealth, name: str, priority: int, stopped: asyncio.Event
) -> None:
    """Keep `health.standby` true while a live peer outranks this operator."""
    api = client.CustomObjectsApi(kube.api())
    while not stopped.is_set():
        try:
            obj = await asyncio.to_thread(
                api.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", name
            )
            health.standby = outranked(obj.get("status") or {}, priority, dt.datetime.now(dt.UTC))
        except Exception as exc:
            log.debug("peering status unavailable: %s", exc)
            health.standby = False
        try:
            await asyncio.wait_for(stopped.wait(), timeout=health.interval)
        except TimeoutError:
            pass

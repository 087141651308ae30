"""Liveness (a coordination.k8s.io Lease) and this replica's own WeightSource entry.

The Lease also carries this pod's RefitJob assignments and reports (jobs.py).

Each agent renews `ferry-agent-<pod>` and server-side-applies only its own
entry in `status.members` of every WeightSource selecting its pod, under its own
field manager (`ferry-agent/<pod>`). On shutdown it stops the heartbeat first
(joining any renewal in flight), then writes Stale and deletes its Lease, and
refuses every later write: nothing can mark it Ready after it began to stop.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from ferry_api import GROUP, VERSION, leases, ssa, times
from ferry_api.meta import selector_matches
from ferry_api.weightsource import ReplicaStatus, WeightSource

log = logging.getLogger(__name__)
LEASE_LABEL = leases.LEASE_LABEL

# Agent.state -> ReplicaStatus.state
STATES = {
    "Ready": "Ready",
    "NoVersion": "NoVersion",  # a pull failed after writing: `reason` says which
    "Empty": "Loading",
    "Declared": "Loading",
    "Writing": "Loading",
    "Pulling": "Loading",
    "Failed": "Failed",  # a local rank's declare failed (allocation, registration, too large)
}


# What the entry takes from the agent's info (runtime.agent_info).
REPORTED = (
    "version",
    "fingerprint",
    "digest",
    "tensors",
    "bytes",
    "rank",
    "reason",
    "localRanks",
    "ranks",
)


@dataclass(frozen=True)
class Identity:
    pod: str
    namespace: str
    node: str | None
    endpoint: str


def _stamp(t: dt.datetime) -> str:
    return times.stamp(t, micro=True)


class Reporter:
    def __init__(
        self,
        ident: Identity,
        info: Callable[[], dict[str, Any]],
        api: client.ApiClient,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.ident = ident
        self.info = info
        self.api = api
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.manager = ssa.agent_manager(ident.pod)
        self.lease_name = leases.lease_name(ident.pod)
        self._lock = threading.Lock()  # serializes writes against shutdown
        self._closing = False
        self._wake = threading.Event()
        self._last: dict[str, dict[str, Any]] = {}
        self._known: list[str] | None = (
            None  # the WeightSources selecting this pod, at the last renewal
        )
        self._thread: threading.Thread | None = None
        self.renewals = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Reporter:
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="ferry-reporter", daemon=True)
        self._thread.start()
        return self

    def poke(self) -> None:
        """Report now (after a publish or a pull) instead of at the next renewal."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # Writes below bypass the closing check on purpose: they are the last ones.
        for ws in self._sources():
            try:
                self._apply_entry(ws, {"state": "Stale"})
            except client.ApiException as exc:
                log.warning("could not mark %s Stale: %s", ws, exc.reason)
        try:
            client.CoordinationV1Api(self.api).delete_namespaced_lease(
                self.lease_name, self.ident.namespace
            )
        except client.ApiException as exc:
            if exc.status != 404:
                log.warning("could not release lease: %s", exc.reason)

    # -- loop --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            poked = self._wake.wait(self.renew_seconds)
            self._wake.clear()
            with self._lock:
                if self._closing:
                    return
            try:
                self._beat(poked)
            except Exception as exc:  # keep beating; the Lease expiring tells the operator
                log.warning("heartbeat failed: %s", exc)

    def _beat(self, poked: bool = False) -> None:
        """A renewal: the Lease, then this replica's entry in each WeightSource selecting
        it. After a poke (a publish) the entries go first, to the WeightSources found at
        the last renewal: a job waiting for the version reads it there, and the Lease
        write and the two reads that find the WeightSources were three round trips
        before it (a new WeightSource is found at the next renewal)."""
        with self._lock:
            if self._closing:
                return
            quick = poked and self._known is not None
            if not quick:
                self._renew()
                self._known = self._sources()
            entry = self._entry()
            for ws in self._known or []:
                if self._last.get(ws) != entry or self.renewals % 12 == 0:
                    self._apply_entry(ws, entry)
                    self._last[ws] = entry
            if quick:
                self._renew()
            self.renewals += 1

    # -- writes ------------------------------------------------------------------
    def _renew(self) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.lease_name,
                "namespace": self.ident.namespace,
                "labels": {LEASE_LABEL: "true"},
            },
            "spec": {
                "holderIdentity": self.ident.pod,
                "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _stamp(dt.datetime.now(dt.UTC)),
            },
        }
        client.CoordinationV1Api(self.api).patch_namespaced_lease(
            self.lease_name,
            self.ident.namespace,
            body,
            field_manager=self.manager,
            force=True,
            _content_type=ssa.APPLY,
        )

    def _entry(self) -> dict[str, Any]:
        """This pod's entry (ReplicaStatus, validated here), less its key `pod`."""
        info = self.info()
        fields = {key: info[key] for key in REPORTED if info.get(key) not in (None, "")}
        fields["state"] = STATES.get(info.get("state", ""), info.get("state")) or "Loading"
        entry = ReplicaStatus.model_validate(
            {
                "pod": self.ident.pod,
                "endpoint": self.ident.endpoint,
                "node": self.ident.node or None,
                **fields,
            }
        ).wire()
        entry.pop("pod")
        return entry

    def _apply_entry(self, ws: str, entry: dict[str, Any]) -> None:
        ssa.apply_status(
            self.api,
            WeightSource,
            self.ident.namespace,
            ws,
            {"members": [{"pod": self.ident.pod, **entry}]},
            self.manager,
        )

    # -- reads -------------------------------------------------------------------
    def _sources(self) -> list[str]:
        """WeightSources in the namespace whose selector matches this pod's labels."""
        core = client.CoreV1Api(self.api)
        try:
            labels = (
                core.read_namespaced_pod(self.ident.pod, self.ident.namespace).metadata.labels or {}
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return []
            raise
        items = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, self.ident.namespace, WeightSource.PLURAL
        )["items"]
        return sorted(
            i["metadata"]["name"]
            for i in items
            if selector_matches(i["spec"].get("selector") or {}, labels)
        )

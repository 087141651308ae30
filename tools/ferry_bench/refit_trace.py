"""Where a one-shot RefitJob's time goes: a timeline of one step from the apiserver's
watch streams (the RefitJob and the agents' Leases), as an observer beside the bench.

Each event is stamped on arrival (perf_counter, the bench's clock), so a phase's
length includes the watch delivery to this process, the same for every phase:

    created    the create call returned
    finalizer  kopf's finalizer on the job (its first pass adds only that)
    running    the operator's first status write (phase Running, targets assigned)
    assigned   the last target's Lease carries its assignment
    pulling    the last target's report Pulling on its Lease
    done       the last target's report Done on its Lease
    complete   status.phase Succeeded on the job
    seen       the bench's poll read Succeeded
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from ferry_api import GROUP, VERSION, leases

PHASES = ("finalizer", "running", "assigned", "pulling", "done", "complete")


class Tracer:
    """Watches RefitJobs and agent Leases in a namespace; `timeline(uid, ...)` says when
    each phase of one job was first seen."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, float]] = {}  # job name -> phase -> first seen
        self._targets: dict[str, dict[str, dict[str, float]]] = {}  # job uid -> pod -> phase -> t
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(fn,), daemon=True)
            for fn in (self._jobs_stream, self._leases_stream)
        ]

    def start(self) -> Tracer:
        for t in self._threads:
            t.start()
        time.sleep(0.2)  # both watches open before the first step
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stream: Any) -> None:
        while not self._stop.is_set():
            try:
                for event in stream():
                    if self._stop.is_set():
                        return
                    self._saw(event, time.perf_counter())
            except Exception:  # a watch the server ended: open it again
                time.sleep(0.05)

    def _jobs_stream(self) -> Iterator[dict[str, Any]]:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(self.api)
        return watch.Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            "refitjobs",
            timeout_seconds=300,
            deserialize=False,
        )

    def _leases_stream(self) -> Iterator[dict[str, Any]]:
        from kubernetes import client, watch

        api = client.CoordinationV1Api(self.api)
        return watch.Watch().stream(
            api.list_namespaced_lease,
            self.namespace,
            label_selector=leases.LEASE_LABEL,
            timeout_seconds=300,
            deserialize=False,
        )

    def _saw(self, event: dict[str, Any], t: float) -> None:
        obj = event.get("object") or {}
        if isinstance(obj, str):
            obj = json.loads(obj)
        meta = obj.get("metadata") or {}
        with self._lock:
            if obj.get("kind") == "RefitJob":
                seen = self._jobs.setdefault(meta.get("name", ""), {})
                phase = (obj.get("status") or {}).get("phase")
                if meta.get("finalizers"):
                    seen.setdefault("finalizer", t)
                if phase == "Running":
                    seen.setdefault("running", t)
                if phase in ("Succeeded", "Failed"):
                    seen.setdefault("complete", t)
                return
            pod = (obj.get("spec") or {}).get("holderIdentity") or ""
            ann = meta.get("annotations") or {}
            for uid in leases.read(ann, leases.ASSIGN):
                self._targets.setdefault(uid, {}).setdefault(pod, {}).setdefault("assigned", t)
            for uid, r in leases.read(ann, leases.REPORT).items():
                phase = {"Pulling": "pulling", "Done": "done", "Failed": "done"}.get(
                    str(r.get("phase"))
                )
                if phase:
                    self._targets.setdefault(uid, {}).setdefault(pod, {}).setdefault(phase, t)

    def timeline(self, name: str, uid: str, created: float, seen: float) -> dict[str, float]:
        """Seconds from the create call's return to each phase (for targets: the last)."""
        deadline = time.perf_counter() + 1.0  # the watches may trail the bench's poll
        while time.perf_counter() < deadline:
            with self._lock:
                if "complete" in self._jobs.get(name, {}):
                    break
            time.sleep(0.01)
        with self._lock:
            marks = dict(self._jobs.get(name, {}))
            pods = self._targets.get(uid, {})
            for phase in ("assigned", "pulling", "done"):
                ts = [p[phase] for p in pods.values() if phase in p]
                if ts and len(ts) == len(pods):
                    marks[phase] = max(ts)
        out = {p: round(marks[p] - created, 4) for p in PHASES if p in marks}
        out["seen"] = round(seen - created, 4)
        return out

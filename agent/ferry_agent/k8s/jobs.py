"""Carry out this pod's RefitJob assignments and report progress in its own entry.

The operator assigns by bumping `attempts` in the job's per-target entry for
this pod (server-side apply); the agent pulls from the named upstream pods and
writes its part of the same entry (AGENT_FIELDS: `phase`, `bytes`, `reason`,
`observedAttempt`, its `endpoint`...) with a JSON patch guarded by a test of the
entry's pod key, under the one field manager every agent shares (see _write).
Progress writes are rate-limited; nothing per chunk reaches the CR.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import urllib3
from kubernetes import client

from ferry_api import GROUP, VERSION, ssa
from ferry_api.refitjob import RefitJob
from ferry_api.weightsource import WeightSource

from ..errors import Cancelled, FerryError
from .reporter import Identity
from .transforms import TransformPulls

log = logging.getLogger(__name__)
TERMINAL = ("Succeeded", "Failed")
# Statuses of an apply that may succeed when repeated (0: no HTTP response at all).
TRANSIENT = (0, 408, 409, 429, 500, 502, 503, 504)
JSON_PATCH = "application/json-patch+json"
# A final report is retried from 0.2 s, doubling, to one try every 5 s.
FINAL_RETRY_S, FINAL_RETRY_MAX_S = 0.2, 5.0
# The fields of a target's entry that its agent writes; the operator owns the rest
# (pod, source, attempts).
AGENT_FIELDS = ("observedAttempt", "endpoint", "phase", "bytes", "reason", "message", "seconds")
# Looks at where this pod's entry is before a write gives up (the list moved under it).
WRITE_TRIES = 4


class UpstreamNotReady(FerryError):
    reason = "UpstreamNotReady"


@dataclass
class Attempt:
    job: str
    uid: str
    number: int
    thread: threading.Thread
    cancel: threading.Event


class JobRunner:
    def __init__(
        self,
        agent: Any,
        ident: Identity,
        api: client.ApiClient,
        poll_s: float = 0.5,
        progress_interval_s: float = 1.0,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.agent = agent
        self.ident = ident
        self.api = api
        self.poll_s = poll_s
        self.progress_interval_s = progress_interval_s
        self.on_done = on_done
        self.manager = ssa.AGENT_MANAGER
        # An operator's cap on pull bandwidth (e.g. to spare a NIC that also serves traffic).
        cap = os.environ.get("FERRY_PULL_MAX_GBPS")
        self.max_gbps = float(cap) if cap else None
        self._stop = threading.Event()
        self._current: Attempt | None = None
        self._seen: dict[str, int] = {}  # job uid -> highest attempt started here
        # job name -> (index, entry) of this pod's entry as last seen or written
        self._where: dict[str, tuple[int, dict[str, Any]]] = {}
        self._thread: threading.Thread | None = None
        self.pulls = TransformPulls(agent, ident, api)  # spec.transform: plain or reshard

    def start(self) -> JobRunner:
        self._thread = threading.Thread(target=self._loop, name="ferry-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._current is not None:
            self._current.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)
        cur = self._current
        if cur is None or not cur.thread.is_alive():
            self.pulls.close()

    # -- watching ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception as exc:
                log.warning("refit job check failed: %s", exc)

    def _jobs(self) -> list[dict[str, Any]]:
        found = cast(
            dict[str, Any],
            client.CustomObjectsApi(self.api).list_namespaced_custom_object(
                GROUP, VERSION, self.ident.namespace, RefitJob.PLURAL
            ),
        )
        return list(found["items"])

    def _tick(self) -> None:
        cur = self._current
        if cur is not None and not cur.thread.is_alive():
            self._current = cur = None
        for job in self._jobs():
            meta, status = job["metadata"], job.get("status") or {}
            where = _find(status, self.ident.pod)
            if where is None:
                continue
            self._where[meta["name"]] = where
            entry = where[1]
            over = meta.get("deletionTimestamp") or status.get("phase") in TERMINAL
            if cur is not None and cur.uid == meta["uid"]:
                if over or (entry.get("attempts") or 0) > cur.number:
                    cur.cancel.set()  # job deleted or failed, or re-assigned under us
                continue
            attempts = entry.get("attempts") or 0
            observed = entry.get("observedAttempt") or 0
            if (
                entry.get("phase") == "Pulling"
                and observed == attempts
                and self._seen.get(meta["uid"], 0) < observed
                and status.get("phase") not in TERMINAL
            ):
                # A previous run of this agent (killed or restarted) took this attempt:
                # nobody pulls it now. Fail it, so that the operator retries it and a
                # deleted job's finalizer is not held for a pull that cannot end.
                self._seen[meta["uid"]] = observed
                log.warning(
                    "refit %s attempt %d was left by a previous run of this agent",
                    meta["name"],
                    observed,
                )
                self._fail(
                    meta["name"],
                    {"observedAttempt": observed, "endpoint": self.ident.endpoint},
                    "AgentRestarted",
                    "the agent restarted during this attempt; its slabs hold no version",
                )
                continue
            done = max(self._seen.get(meta["uid"], 0), observed)
            if over or attempts <= done or cur is not None:
                continue
            self._seen[meta["uid"]] = attempts
            cancel = threading.Event()
            thread = threading.Thread(
                target=self._attempt,
                args=(job, entry, attempts, cancel),
                name=f"ferry-pull-{meta['name']}",
                daemon=True,
            )
            self._current = cur = Attempt(meta["name"], meta["uid"], attempts, thread, cancel)
            thread.start()

    # -- one attempt -------------------------------------------------------------
    def _attempt(
        self, job: dict[str, Any], entry: dict[str, Any], number: int, cancel: threading.Event
    ) -> None:
        name, spec, status = job["metadata"]["name"], job["spec"], job.get("status") or {}
        started = time.monotonic()
        report = {"observedAttempt": number, "endpoint": self.ident.endpoint}
        progress = _ProgressWriter(self, name, report, self.progress_interval_s)
        try:
            self._write(name, {**report, "phase": "Pulling", "bytes": 0})
            upstream = [p for p in (entry.get("source") or "").split(",") if p]
            deadline = started + max(1.0, _remaining(status, spec))
            endpoints, relay = self._endpoints(name, spec, upstream, cancel, deadline)
            pause = spec.get("pause") or {}
            mode = pause.get("mode", "engine")
            progress.start()
            try:
                result = self.pulls.pull(
                    spec,
                    endpoints,
                    version=status.get("version"),
                    timeout_s=max(1.0, deadline - time.monotonic()),
                    chunk_bytes=(spec.get("strategy") or {}).get("chunkBytes"),
                    quiesce=mode != "none",
                    quiesce_timeout_s=float(pause.get("timeoutSeconds", 30)),
                    max_gbps=self.max_gbps,
                    cancel=cancel,
                    progress=progress.update,
                    relay=relay,
                    double_buffer=mode == "doubleBuffer",
                )
            finally:
                progress.stop()  # no Pulling write may land after the final one
            if cancel.is_set():
                raise Cancelled("the job was deleted or re-assigned during the pull")
            self._report(
                name,
                {
                    **report,
                    "phase": "Done",
                    "bytes": int(result.bytes),
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            log.info(
                "refit %s attempt %d: %d bytes from %s%s in %.2fs",
                name,
                number,
                result.bytes,
                ",".join(upstream),
                " (relay: followed while it pulled)" if relay else "",
                time.monotonic() - started,
            )
        except FerryError as exc:
            log.warning("refit %s attempt %d failed: %s: %s", name, number, exc.reason, exc.message)
            self._fail(name, {**report, "bytes": progress.bytes}, exc.reason, exc.message)
        except Exception as exc:  # an unexpected error must still end the attempt visibly
            log.exception("refit %s attempt %d crashed", name, number)
            self._fail(
                name,
                {**report, "bytes": progress.bytes},
                "AgentError",
                f"{type(exc).__name__}: {exc}",
            )
        finally:
            if self.on_done:
                self.on_done()

    def _fail(self, job: str, report: dict[str, Any], reason: str, message: str) -> None:
        self._report(
            job, {**report, "phase": "Failed", "reason": reason, "message": message[:1000]}
        )

    def _report(self, job: str, fields: dict[str, Any]) -> None:
        """An attempt's last word (Done or Failed), retried while the apiserver cannot take
        it: an entry left Pulling would hold the job until its deadline, and nothing else
        would ever write it. A deleted job needs no report; a stopping agent gives up."""
        delay = FINAL_RETRY_S
        while True:
            try:
                self._write(job, fields)
                return
            except client.ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status not in TRANSIENT:
                    raise
                err: Exception = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # apiserver unreachable
                err = exc
            log.warning(
                "report of %s (%s) not written, retrying in %.1fs: %s",
                job,
                fields.get("phase"),
                delay,
                err,
            )
            if self._stop.wait(delay):
                return
            delay = min(2 * delay, FINAL_RETRY_MAX_S)

    def _endpoints(
        self,
        job: str,
        spec: dict[str, Any],
        pods: list[str],
        cancel: threading.Event,
        deadline: float,
    ) -> tuple[list[str], bool]:
        """Upstream pods to gRPC endpoints, and whether to follow the upstream as a relay.

        Source replicas come from the WeightSource; other targets from this job's
        entries: once Done, or for strategy chain as soon as they are Pulling (their
        endpoint is in the entry then), followed chunk by chunk (relay)."""
        api = client.CustomObjectsApi(self.api)
        while True:
            ws = _obj(
                api.get_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.ident.namespace,
                    WeightSource.PLURAL,
                    spec["sourceRef"]["name"],
                )
            )
            rj = _obj(
                api.get_namespaced_custom_object(
                    GROUP, VERSION, self.ident.namespace, RefitJob.PLURAL, job
                )
            )
            members = {m["pod"]: m for m in (ws.get("status") or {}).get("members") or []}
            targets = {t["pod"]: t for t in (rj.get("status") or {}).get("targets") or []}
            chain = (spec.get("strategy") or {}).get("type") == "chain" and len(pods) == 1
            serving = ("Done", "Pulling") if chain else ("Done",)
            out, missing, relay = [], [], False
            for pod in pods:
                t = targets.get(pod) or {}
                if pod in members and members[pod].get("endpoint"):
                    out.append(members[pod]["endpoint"])
                elif t.get("phase") in serving and t.get("endpoint"):
                    out.append(t["endpoint"])
                    relay = chain
                else:
                    missing.append(pod)
            if not missing:
                return out, relay
            if cancel.is_set():
                raise Cancelled("cancelled while waiting for the upstream")
            if time.monotonic() > deadline:
                raise UpstreamNotReady(f"upstream not serving: {', '.join(missing)}")
            time.sleep(min(self.poll_s, 0.2))  # an upstream target that has not started

    def _write(self, job: str, fields: dict[str, Any]) -> None:
        """Make this pod's part of its entry (AGENT_FIELDS) exactly `fields`.

        A JSON patch under the one field manager all agents share, guarded by a test
        of the entry's pod key: if the list moved since we looked, the patch lands
        nowhere and we look again. One server-side-apply field manager per pod made
        every write walk every pod's managed field set (a write cost O(targets in
        flight): 217 ms against 42 ms at 200 targets, docs/benchmarks.md) and left
        ~250 bytes of managedFields per pod on the object."""
        api = client.CustomObjectsApi(self.api)
        where = self._where.get(job)
        for _ in range(WRITE_TRIES):
            if where is None:
                where = self._locate(job)
                if where is None:
                    return  # no entry for this pod (job re-created): nothing to report into
            i, entry = where
            path = f"/status/targets/{i}"
            ops: list[dict[str, Any]] = [
                {"op": "test", "path": f"{path}/pod", "value": self.ident.pod}
            ]
            for key in AGENT_FIELDS:
                if fields.get(key) is not None:
                    ops.append({"op": "add", "path": f"{path}/{key}", "value": fields[key]})
                elif key in entry:
                    ops.append({"op": "remove", "path": f"{path}/{key}"})
            try:
                api.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.ident.namespace,
                    RefitJob.PLURAL,
                    job,
                    ops,
                    field_manager=self.manager,
                    _content_type=JSON_PATCH,
                    _preload_content=False,
                )
            except client.ApiException as exc:
                if exc.status not in (409, 422):  # 422: the test failed or a path moved
                    raise
                where = None
                continue
            kept = {k: v for k, v in entry.items() if k not in AGENT_FIELDS}
            self._where[job] = (i, kept | {k: v for k, v in fields.items() if v is not None})
            return
        raise client.ApiException(status=409, reason=f"the entry of {self.ident.pod} kept moving")

    def _locate(self, job: str) -> tuple[int, dict[str, Any]] | None:
        obj = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.ident.namespace, RefitJob.PLURAL, job
        )
        return _find(_obj(obj).get("status") or {}, self.ident.pod)


class _ProgressWriter:
    """Writes `bytes` into this pod's entry at most once per interval while a pull runs.
    The pull only records the latest count (update); the writing happens here."""

    def __init__(self, runner: JobRunner, job: str, report: dict[str, Any], interval: float):
        self.runner, self.job, self.report, self.interval = runner, job, report, interval
        self.bytes = 0
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"ferry-progress-{job}", daemon=True
        )

    def update(self, done: int) -> None:
        self.bytes = done

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            done = self.bytes
            if done == self._written:
                continue
            try:
                self.runner._write(self.job, {**self.report, "phase": "Pulling", "bytes": done})
                self._written = done
            except Exception as exc:  # progress is best effort; the final write is not
                log.debug("progress write for %s: %s", self.job, exc)


def _find(status: dict[str, Any], pod: str) -> tuple[int, dict[str, Any]] | None:
    """(index, entry) of `pod`'s entry in a RefitJob status, or None."""
    return next(
        ((i, e) for i, e in enumerate(status.get("targets") or []) if e.get("pod") == pod), None
    )


def _obj(value: object) -> dict[str, Any]:
    """The kubernetes client types custom objects as `object`; they are JSON dicts."""
    return cast(dict[str, Any], value)


def _remaining(status: dict[str, Any], spec: dict[str, Any]) -> float:
    from datetime import UTC, datetime

    start = status.get("startTime")
    timeout = float(spec.get("timeoutSeconds", 600))
    if not start:
        return timeout
    began = datetime.fromisoformat(start.replace("Z", "+00:00"))
    return timeout - (datetime.now(UTC) - began).total_seconds()

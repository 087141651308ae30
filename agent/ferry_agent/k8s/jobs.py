"""Carry out this pod's RefitJob assignments and report on them, all through its Lease.

The operator puts the attempt this pod must run on the agent's Lease (an
`assign.ferry.dev/<job uid>` annotation: job, attempt, upstream pods, version,
spec; ferry_api.leases). The agent watches only that Lease, pulls, and writes its
progress back onto it (`report.ferry.dev/<job uid>`: attempt, phase, bytes,
endpoint...); the operator folds the reports into the job's entries. An agent never
reads or writes the RefitJob object, whose size grows with its targets. Progress
writes are rate-limited; nothing per chunk reaches the API.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import urllib3
from kubernetes import client, watch

from ferry_api import GROUP, VERSION, leases, ssa
from ferry_api.weightsource import WeightSource

from ..errors import Cancelled, FerryError
from .reporter import Identity
from .transforms import TransformPulls

log = logging.getLogger(__name__)
FINAL = ("Done", "Failed")
# Statuses of a write that may succeed when repeated (0: no HTTP response at all; 404:
# the Lease is being re-created by the next renewal).
TRANSIENT = (0, 404, 408, 409, 429, 500, 502, 503, 504)
# A final report is retried from 0.2 s, doubling, to one try every 5 s.
FINAL_RETRY_S, FINAL_RETRY_MAX_S = 0.2, 5.0
# The server ends each watch of the Lease after this long; the agent lists and watches again.
WATCH_TIMEOUT_S = 60
# Reports kept on the Lease after their assignment is gone, newest first: a downstream
# target of a chain or tree finds its upstream's endpoint and outcome there, and a
# deleted job's finalizer folds the cancellation into the job.
KEEP_REPORTS = 8


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
        self.poll_s = poll_s  # how often an unready upstream is looked at again
        self.progress_interval_s = progress_interval_s
        self.on_done = on_done
        # An operator's cap on pull bandwidth (e.g. to spare a NIC that also serves traffic).
        cap = os.environ.get("FERRY_PULL_MAX_GBPS")
        self.max_gbps = float(cap) if cap else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._annotations: dict[str, str] = {}  # of this pod's Lease, as last seen
        self._current: Attempt | None = None
        self._seen: dict[str, int] = {}  # job uid -> highest attempt started here
        self._finished: list[str] = []  # job uids with a final report, oldest first
        self._loop_thread: threading.Thread | None = None
        self.pulls = TransformPulls(agent, ident, api)  # spec.transform: plain or reshard

    def start(self) -> JobRunner:
        threading.Thread(target=self._watch, name="ferry-jobs-watch", daemon=True).start()
        self._loop_thread = threading.Thread(target=self._loop, name="ferry-jobs", daemon=True)
        self._loop_thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._current is not None:
            self._current.cancel.set()
        # Only the loop is joined: the watch thread may sit in a read until the next event
        # or its server timeout, and all it does is hand annotations to the stopped loop.
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
        cur = self._current
        if cur is None or not cur.thread.is_alive():
            self.pulls.close()

    # -- watching this pod's Lease -------------------------------------------------
    def _watch(self) -> None:
        """List, then watch, this pod's Lease alone; every change wakes the loop."""
        coord = client.CoordinationV1Api(self.api)
        only = f"metadata.name={leases.lease_name(self.ident.pod)}"
        while not self._stop.is_set():
            try:
                raw = coord.list_namespaced_lease(
                    self.ident.namespace, field_selector=only, _preload_content=False
                )
                found = json.loads(raw.data)
                for item in found["items"]:
                    self._saw(item["metadata"].get("annotations"))
                stream = watch.Watch().stream(
                    coord.list_namespaced_lease,
                    self.ident.namespace,
                    field_selector=only,
                    resource_version=found["metadata"]["resourceVersion"],
                    timeout_seconds=WATCH_TIMEOUT_S,
                    _request_timeout=WATCH_TIMEOUT_S + 10,
                    deserialize=False,  # plain JSON
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._saw(event["object"]["metadata"].get("annotations"))
            except Exception as exc:  # apiserver away, watch expired (410): list again
                log.debug("watch of the agent Lease ended: %s", exc)
                self._stop.wait(1.0)

    def _saw(self, annotations: dict[str, str] | None) -> None:
        self._annotations = dict(annotations or {})
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception as exc:
                log.warning("refit assignment check failed: %s", exc)

    def _tick(self) -> None:
        seen = self._annotations
        assigned = leases.read(seen, leases.ASSIGN)
        reports = leases.read(seen, leases.REPORT)
        cur = self._current
        if cur is not None and not cur.thread.is_alive():
            self._current = cur = None
        if cur is not None:
            now = assigned.get(cur.uid)
            if now is None or _int(now.get("attempt")) > cur.number:
                cur.cancel.set()  # job ended or deleted, or re-assigned under us
        self._prune(assigned, reports, cur)
        if cur is not None:
            return
        for uid, job in sorted(assigned.items(), key=lambda kv: str(kv[1].get("startTime"))):
            number, mine = _int(job.get("attempt")), reports.get(uid) or {}
            if number < 1 or not isinstance(job.get("spec"), dict):
                continue
            if (
                mine.get("phase") == "Pulling"
                and _int(mine.get("attempt")) == number
                and self._seen.get(uid, 0) < number
            ):
                # A previous run of this agent (killed or restarted) took this attempt:
                # nobody pulls it now. Fail it, so that the operator retries it and a
                # deleted job's finalizer is not held for a pull that cannot end.
                self._seen[uid] = number
                log.warning("refit %s attempt %d was left by a previous run of this agent",
                            job.get("job"), number)
                self._fail(uid, {"attempt": number, "endpoint": self.ident.endpoint},
                           "AgentRestarted",
                           "the agent restarted during this attempt; its slabs hold no version")
                continue
            answered = _int(mine.get("attempt")) if mine.get("phase") in FINAL else 0
            if number <= max(self._seen.get(uid, 0), answered):
                continue
            self._seen[uid] = number
            cancel = threading.Event()
            name = str(job.get("job"))
            thread = threading.Thread(
                target=self._attempt,
                args=(uid, job, number, cancel),
                name=f"ferry-pull-{name}",
                daemon=True,
            )
            self._current = Attempt(name, uid, number, thread, cancel)
            thread.start()
            return

    def _prune(self, assigned: dict[str, Any], reports: dict[str, Any], cur: Attempt | None) -> None:
        """Drop the reports whose assignment is gone (the operator folded them, or the job
        ended) beyond the KEEP_REPORTS newest."""
        gone = [u for u in reports if u not in assigned and (cur is None or cur.uid != u)]
        # Oldest first: those of a previous run of this agent, then in the order finished here.
        gone.sort(key=lambda u: self._finished.index(u) if u in self._finished else -1)
        drop = gone[: max(0, len(gone) - KEEP_REPORTS)]
        if drop:
            try:
                self._patch({leases.REPORT + u: None for u in drop})
            except Exception as exc:  # the next tick tries again
                log.debug("could not prune reports: %s", exc)

    # -- one attempt -------------------------------------------------------------
    def _attempt(self, uid: str, job: dict[str, Any], number: int, cancel: threading.Event) -> None:
        name, spec = str(job["job"]), job["spec"]
        started = time.monotonic()
        report = {"attempt": number, "endpoint": self.ident.endpoint}
        progress = _ProgressWriter(self, uid, report, self.progress_interval_s)
        try:
            self._write(uid, {**report, "phase": "Pulling", "bytes": 0})
            upstream = [p for p in str(job.get("source") or "").split(",") if p]
            deadline = started + max(1.0, _remaining(job.get("startTime"), spec))
            endpoints, relay = self._endpoints(uid, spec, upstream, cancel, deadline)
            pause = spec.get("pause") or {}
            mode = pause.get("mode", "engine")
            progress.start()
            try:
                result = self.pulls.pull(
                    spec,
                    endpoints,
                    version=job.get("version"),
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
                uid,
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
            self._fail(uid, {**report, "bytes": progress.bytes}, exc.reason, exc.message)
        except Exception as exc:  # an unexpected error must still end the attempt visibly
            log.exception("refit %s attempt %d crashed", name, number)
            self._fail(
                uid,
                {**report, "bytes": progress.bytes},
                "AgentError",
                f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._finished = [u for u in self._finished if u != uid] + [uid]
            self._wake.set()  # the next assignment may already be on the Lease
            if self.on_done:
                self.on_done()

    def _fail(self, uid: str, report: dict[str, Any], reason: str, message: str) -> None:
        self._report(
            uid, {**report, "phase": "Failed", "reason": reason, "message": message[:1000]}
        )

    def _report(self, uid: str, fields: dict[str, Any]) -> None:
        """An attempt's last word (Done or Failed), retried while the apiserver cannot take
        it: an attempt left Pulling would hold the job until its deadline, and nothing else
        would ever report it. A stopping agent gives up."""
        delay = FINAL_RETRY_S
        while True:
            try:
                self._write(uid, fields)
                return
            except client.ApiException as exc:
                if exc.status not in TRANSIENT:
                    raise
                err: Exception = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # apiserver unreachable
                err = exc
            log.warning(
                "report on job %s (%s) not written, retrying in %.1fs: %s",
                uid,
                fields.get("phase"),
                delay,
                err,
            )
            if self._stop.wait(delay):
                return
            delay = min(2 * delay, FINAL_RETRY_MAX_S)

    def _endpoints(
        self,
        uid: str,
        spec: dict[str, Any],
        pods: list[str],
        cancel: threading.Event,
        deadline: float,
    ) -> tuple[list[str], bool]:
        """Upstream pods to gRPC endpoints, and whether to follow the upstream as a relay.

        Source replicas come from the WeightSource; other targets from their own
        Lease's report on this job: once Done, or for strategy chain as soon as they
        are Pulling (their endpoint is in the report then), followed chunk by chunk
        (relay)."""
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
            members = {m["pod"]: m for m in (ws.get("status") or {}).get("members") or []}
            chain = (spec.get("strategy") or {}).get("type") == "chain" and len(pods) == 1
            serving = ("Done", "Pulling") if chain else ("Done",)
            out, missing, relay = [], [], False
            for pod in pods:
                if pod in members and members[pod].get("endpoint"):
                    out.append(members[pod]["endpoint"])
                    continue
                theirs = self._report_of(pod, uid)
                if theirs.get("phase") in serving and theirs.get("endpoint"):
                    out.append(str(theirs["endpoint"]))
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

    def _report_of(self, pod: str, uid: str) -> dict[str, Any]:
        """Another target's report on job `uid`, from its agent's Lease ({} if none)."""
        try:
            lease = client.CoordinationV1Api(self.api).read_namespaced_lease(
                leases.lease_name(pod), self.ident.namespace
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return leases.read(lease.metadata.annotations, leases.REPORT).get(uid) or {}

    def _write(self, uid: str, fields: dict[str, Any]) -> None:
        """This pod's report on job `uid`: one small merge patch of its own Lease."""
        self._patch({leases.REPORT + uid: leases.encode(fields)})

    def _patch(self, annotations: dict[str, str | None]) -> None:
        leases.patch(self.api, self.ident.namespace, self.ident.pod, annotations, ssa.AGENT_MANAGER)


class _ProgressWriter:
    """Reports `bytes` on this pod's Lease at most once per interval while a pull runs.
    The pull only records the latest count (update); the writing happens here."""

    def __init__(self, runner: JobRunner, uid: str, report: dict[str, Any], interval: float):
        self.runner, self.uid, self.report, self.interval = runner, uid, report, interval
        self.bytes = 0
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"ferry-progress-{uid}", daemon=True
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
                self.runner._write(self.uid, {**self.report, "phase": "Pulling", "bytes": done})
                self._written = done
            except Exception as exc:  # progress is best effort; the final write is not
                log.debug("progress report on job %s: %s", self.uid, exc)


def _int(value: Any) -> int:
    """A count from an annotation anyone could edit; anything else counts as 0."""
    return leases.count(value) or 0


def _obj(value: object) -> dict[str, Any]:
    """The kubernetes client types custom objects as `object`; they are JSON dicts."""
    return cast(dict[str, Any], value)


def _remaining(start: str | None, spec: dict[str, Any]) -> float:
    from datetime import UTC, datetime

    timeout = float(spec.get("timeoutSeconds", 600))
    if not start:
        return timeout
    began = datetime.fromisoformat(start.replace("Z", "+00:00"))
    return timeout - (datetime.now(UTC) - began).total_seconds()

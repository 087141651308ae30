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
from pydantic import ValidationError

from ferry_api import GROUP, VERSION, leases, ssa, times
from ferry_api.leases import Assignment, Report
from ferry_api.ranks import RankAddress
from ferry_api.weightsource import WeightSource

from ..errors import Cancelled, FerryError
from .job_decision import Running, decide
from .reporter import Identity
from .transforms import TransformPulls

log = logging.getLogger(__name__)
FINAL = ("Done", "Failed")
# A final report is retried from 0.2 s, doubling, to one try every 5 s.
FINAL_RETRY_S, FINAL_RETRY_MAX_S = 0.2, 5.0
# The server ends each watch of the Lease after this long; the agent lists and watches again.
WATCH_TIMEOUT_S = 60


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
        # Others reading this Lease's annotations from the same watch (k8s/following.py).
        self.listeners: list[Callable[[dict[str, str]], None]] = []

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
        for listener in self.listeners:
            try:
                listener(self._annotations)
            except Exception:
                log.exception("Lease annotation listener failed")
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
        cur = self._current
        if cur is not None and not cur.thread.is_alive():
            self._current = cur = None
        nxt = decide(
            self._annotations,
            Running(cur.uid, cur.number) if cur else None,
            self._seen,
            self._finished,
        )
        self._seen = dict(nxt.seen)
        if nxt.cancel and cur is not None:
            cur.cancel.set()
        if nxt.prune:
            try:
                self._patch({leases.REPORT + u: None for u in nxt.prune})
            except Exception as exc:  # the next tick tries again
                log.debug("could not prune reports: %s", exc)
        for f in nxt.fail:
            log.warning(
                "refit job %s attempt %d not run: %s: %s", f.uid, f.attempt, f.reason, f.message
            )
            self._fail(
                f.uid,
                Report(attempt=f.attempt, phase="Failed", endpoint=self.ident.endpoint),
                f.reason,
                f.message,
            )
        if nxt.start is not None:
            uid, job = nxt.start
            cancel = threading.Event()
            thread = threading.Thread(
                target=self._attempt,
                args=(uid, job, cancel),
                name=f"ferry-pull-{job.job}",
                daemon=True,
            )
            self._current = Attempt(job.job, uid, job.attempt, thread, cancel)
            thread.start()

    # -- one attempt -------------------------------------------------------------
    def _attempt(self, uid: str, job: Assignment, cancel: threading.Event) -> None:
        name, spec, number = job.job, job.spec, job.attempt
        started = time.monotonic()
        report = Report(attempt=number, phase="Pulling", endpoint=self.ident.endpoint, bytes=0)
        # Pulling is written by the progress writer, beside the pull: off the attempt's path.
        progress = _ProgressWriter(self, uid, report, self.progress_interval_s)
        try:
            progress.start()
            deadline = started + max(1.0, _remaining(job))
            try:
                endpoints, relay = self._endpoints(uid, job, cancel, deadline)
                ranks = rank_sources(job, endpoints)
                mode = spec.pause.mode
                pulling = time.monotonic()  # `seconds` is the pull's, not the reads before it
                result = self.pulls.pull(
                    spec,
                    endpoints,
                    version=job.version,
                    timeout_s=max(1.0, deadline - time.monotonic()),
                    chunk_bytes=spec.strategy.chunk_bytes,
                    quiesce=mode != "none",
                    quiesce_timeout_s=float(spec.pause.timeout_seconds),
                    max_gbps=self.max_gbps,
                    cancel=cancel,
                    progress=progress.update,
                    relay=relay,
                    double_buffer=mode == "doubleBuffer",
                    verify=spec.verify,
                    ranks=ranks,
                )
            finally:
                progress.stop()  # no Pulling write may land after the final one
            if cancel.is_set():
                raise Cancelled("the job was deleted or re-assigned during the pull")
            seconds = min(round(time.monotonic() - pulling, 3), leases.MAX_SECONDS)
            self.write_final(
                uid,
                report.model_copy(
                    update={"phase": "Done", "bytes": int(result.bytes), "seconds": seconds}
                ),
            )
            log.info(
                "refit %s attempt %d: %d bytes from %s%s in %.2fs",
                name,
                number,
                result.bytes,
                job.source,
                " (relay: followed while it pulled)" if relay else "",
                time.monotonic() - started,
            )
        except FerryError as exc:
            log.warning("refit %s attempt %d failed: %s: %s", name, number, exc.reason, exc.message)
            self._fail(
                uid, report.model_copy(update={"bytes": progress.bytes}), exc.reason, exc.message
            )
        except Exception as exc:  # an unexpected error must still end the attempt visibly
            log.exception("refit %s attempt %d crashed", name, number)
            self._fail(
                uid,
                report.model_copy(update={"bytes": progress.bytes}),
                "AgentError",
                f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._finished = [u for u in self._finished if u != uid] + [uid]
            self._wake.set()  # the next assignment may already be on the Lease
            if self.on_done:
                self.on_done()

    def _fail(self, uid: str, report: Report, reason: str, message: str) -> None:
        self.write_final(
            uid,
            Report.model_validate(
                {**report.wire(), "phase": "Failed", "reason": reason, "message": message}
            ),
        )

    def write_final(self, uid: str, report: Report) -> None:
        """An attempt's last word (Done or Failed), retried until it is written: an attempt
        left Pulling would hold the job until its deadline (and a deleted job's finalizer
        until then), and nothing else would ever report it. Every failure is retried,
        refusals too: a kube-apiserver that has just restarted answers 401 and 403 before
        its token and RBAC caches are filled. Only a stopping agent gives up."""
        delay = FINAL_RETRY_S
        while True:
            try:
                self.write_report(uid, report)
                return
            except client.ApiException as exc:
                err = f"{exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # apiserver unreachable
                err = f"{type(exc).__name__}: {exc}"
            log.warning(
                "report on job %s (%s) not written, retrying in %.1fs: %s",
                uid,
                report.phase,
                delay,
                err,
            )
            if self._stop.wait(delay):
                return
            delay = min(2 * delay, FINAL_RETRY_MAX_S)

    def _endpoints(
        self, uid: str, job: Assignment, cancel: threading.Event, deadline: float
    ) -> tuple[list[str], bool]:
        """Upstream pods to gRPC endpoints, and whether to follow the upstream as a relay.

        Source replicas come from the WeightSource; other targets from the assignment
        (the operator puts the endpoints of upstream targets it has seen there; for
        chain it may add one while this attempt waits) or else from their own Lease's
        report on this job: once Done, or for strategy chain as soon as they are
        Pulling, followed chunk by chunk (relay)."""
        api = client.CustomObjectsApi(self.api)
        pods = list(job.upstream)
        chain = job.spec.strategy.type == "chain" and len(pods) == 1
        serving = ("Done", "Pulling") if chain else ("Done",)
        while True:
            ws = _obj(
                api.get_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.ident.namespace,
                    WeightSource.PLURAL,
                    job.spec.source_ref.name,
                )
            )
            members = {m["pod"]: m for m in (ws.get("status") or {}).get("members") or []}
            known = self._assigned_endpoints(uid, job)
            out, missing, relay = [], [], False
            for pod in pods:
                if pod in members and members[pod].get("endpoint"):
                    out.append(self._address(pod, members[pod]["endpoint"]))
                    continue
                if pod in known:
                    out.append(self._address(pod, known[pod]))
                    relay = chain
                    continue
                theirs = self._report_of(pod, uid)
                if theirs is not None and theirs.phase in serving and theirs.endpoint:
                    out.append(self._address(pod, theirs.endpoint))
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

    def _address(self, pod: str, endpoint: str) -> str:
        """In cluster mode (mTLS) the pod is part of the address: the peer is dialled only
        as that pod (its certificate must name it), and only if it is related to ours
        (k8s/peerpolicy.py). An endpoint string alone is never trusted."""
        return f"{pod}@{endpoint}" if getattr(self.agent, "tls", None) is not None else endpoint

    def _assigned_endpoints(self, uid: str, job: Assignment) -> dict[str, str]:
        """Upstream targets' endpoints from the latest assignment of this attempt."""
        raw = leases.read(self._annotations, leases.ASSIGN).get(uid)
        if raw is not None and leases.attempt_of(raw) == job.attempt:
            try:
                job = Assignment.from_annotation(raw)
            except ValidationError:
                pass
        return dict(job.endpoints or {})

    def _report_of(self, pod: str, uid: str) -> Report | None:
        """Another target's report on job `uid`, from its agent's Lease."""
        try:
            lease = client.CoordinationV1Api(self.api).read_namespaced_lease(
                leases.lease_name(pod), self.ident.namespace
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return Report.parse(leases.read(lease.metadata.annotations, leases.REPORT).get(uid))

    def write_report(self, uid: str, report: Report) -> None:
        """This pod's report on job `uid`: one small merge patch of its own Lease."""
        self._patch({leases.REPORT + uid: report.encode()})

    def _patch(self, annotations: dict[str, str | None]) -> None:
        leases.patch(self.api, self.ident.namespace, self.ident.pod, annotations, ssa.AGENT_MANAGER)


class _ProgressWriter:
    """Reports Pulling on this pod's Lease as the attempt starts, then `bytes` at most
    once per interval while the pull runs. The pull only records the latest count
    (update); the writing happens here, so no write waits on the apiserver in the
    attempt's path, and stop() joins a write in flight: the final report lands last."""

    def __init__(self, runner: JobRunner, uid: str, report: Report, interval: float):
        self.runner, self.uid, self.report, self.interval = runner, uid, report, interval
        self.bytes = 0
        self._written = -1  # nothing yet: the first pass writes Pulling
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
        while not self._stop.is_set():
            done = self.bytes
            if done != self._written:
                try:
                    self.runner.write_report(
                        self.uid, self.report.model_copy(update={"bytes": done})
                    )
                    self._written = done
                except Exception as exc:  # progress is best effort; the final write is not
                    log.debug("progress report on job %s: %s", self.uid, exc)
            if self._stop.wait(self.interval):
                return


def rank_sources(job: Assignment, endpoints: list[str]) -> list[list[str]] | None:
    """With ranks inside pods, each local rank's sources as agent addresses (host:port/r,
    request.SourceAddress); `endpoints` are those of job.upstream, in its order. None
    when the assignment has no per-rank part (a pod of one rank, pulling from pods of one
    rank)."""
    if not job.ranks:
        return None
    of = dict(zip(job.upstream, endpoints, strict=True))
    out: list[list[str]] = [[] for _ in job.ranks]
    for r in sorted(job.ranks, key=lambda r: r.local_rank):
        if r.local_rank >= len(out):
            raise FerryError(
                f"assignment ranks: local rank {r.local_rank} out of 0..{len(out) - 1}"
            )
        for a in r.sources:
            addr = RankAddress.parse(a)
            out[r.local_rank].append(of[addr.pod] + (f"/{addr.local}" if addr.local else ""))
    return out


def _obj(value: object) -> dict[str, Any]:
    """The kubernetes client types custom objects as `object`; they are JSON dicts."""
    return cast(dict[str, Any], value)


def _remaining(job: Assignment) -> float:
    """Seconds left of the job's spec.timeoutSeconds, counted from its start."""
    began = times.parse(job.start_time)
    timeout = float(job.spec.timeout_seconds)
    if began is None:
        return timeout
    return timeout - (times.now() - began).total_seconds()

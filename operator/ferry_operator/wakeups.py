"""Reconcile a running RefitJob as soon as one of its targets reports an outcome,
instead of at its next 1 s progress timer.

An agent's final report (`report.ferry.dev/<uid>` phase Done or Failed, for the
attempt its Lease is assigned) arrives on the operator's own watch of the agent
Leases (AgentLeaseWatch: label-selected at the apiserver, so no foreign Lease
streams here; kopf's Lease watch carries only the canary's label). The decision
below says which job it finishes, and the job is reconciled right away from a fresh
read, on a worker thread so the watch goes on reading. Reports that arrive while
that job's reconcile runs are coalesced into one more pass after it (N targets
finishing together cost at most two extra reconciles, not N). The timer stays the
fallback: this only makes a job finish sooner.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ferry_api import leases

log = logging.getLogger(__name__)
FINAL = ("Done", "Failed")
SEEN_MAX = 100_000  # (lease, uid, attempt, phase) remembered before the set starts over
JobKey = tuple[str, str, str]  # a RefitJob: namespace, name, uid


def finished_jobs(
    annotations: dict[str, str] | None, seen: set[tuple[str, str, int, str]], lease: str = ""
) -> dict[str, str]:
    """uid -> job name for each job whose assigned attempt this Lease (`lease`: its
    namespace/name) newly reports final. `seen` (lease, uid, attempt, phase) is updated
    so a report wakes a job once; every target's report wakes it, not the first alone."""
    assigned = leases.read(annotations, leases.ASSIGN)
    out = {}
    for uid, report in leases.read(annotations, leases.REPORT).items():
        job = assigned.get(uid) or {}
        attempt, phase = leases.count(report.get("attempt")), report.get("phase")
        if phase not in FINAL or not attempt or attempt != job.get("attempt") or not job.get("job"):
            continue
        key = (lease, uid, attempt, str(phase))
        if key in seen:
            continue
        seen.add(key)
        out[uid] = str(job["job"])
    return out


@dataclass
class Coalescer:
    """Runs `fn(key)` now unless a run for `key` is in progress; then once more after it."""

    fn: Callable[[Any], None]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: set[Any] = field(default_factory=set)
    _again: set[Any] = field(default_factory=set)

    def __call__(self, key: Any) -> None:
        with self._lock:
            if key in self._running:
                self._again.add(key)
                return
            self._running.add(key)
        try:
            while True:
                self.fn(key)
                with self._lock:
                    if key not in self._again:
                        self._running.discard(key)
                        return
                    self._again.discard(key)
        except BaseException:
            with self._lock:
                self._running.discard(key)
                self._again.discard(key)
            raise


class ReportWakeups:
    """Agent Lease annotations in, job reconciles out: each newly final report wakes
    its job once (`finished_jobs`), through one Coalescer, on a small pool."""

    def __init__(self, reconcile: Callable[[JobKey], None], workers: int = 4) -> None:
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, int, str]] = set()
        self._wake = Coalescer(reconcile)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ferry-wakeup")

    def seen(self, namespace: str, lease: str, annotations: dict[str, str] | None) -> list[str]:
        """The jobs the annotations of Lease `lease` wake (submitted), by name."""
        with self._lock:
            if len(self._seen) > SEEN_MAX:
                self._seen.clear()
            found = finished_jobs(annotations, self._seen, f"{namespace}/{lease}")
        for uid, name in sorted(found.items()):
            self.wake((namespace, name, uid))
        return sorted(set(found.values()))

    def wake(self, key: JobKey) -> None:
        """Reconcile job `key` (namespace, name, uid) soon, on the pool."""
        self._pool.submit(self._run, key)

    def _run(self, key: JobKey) -> None:
        try:
            self._wake(key)
        except Exception:  # the progress timer reconciles it again
            log.exception("reconcile of RefitJob %s/%s on its report failed", key[0], key[1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def newer(rv: str | None, than: str | None) -> bool:
    """Whether resourceVersion `rv` is newer than `than` (etcd revisions are numbers; any
    other pair counts as newer when it differs)."""
    if rv is None or than is None:
        return rv is not None and than is None
    if rv.isdigit() and than.isdigit():
        return int(rv) > int(than)
    return rv != than


class SourceWaiters:
    """RefitJobs with targets waiting for a source to serve their version, by
    WeightSource: the next change of that WeightSource (an agent's member entry showing
    the version just published) wakes them, not the next progress timer. A change seen
    between the job's read of the WeightSource and its `wait` wakes it at once."""

    def __init__(self) -> None:
        self.wake: Callable[[JobKey], None] | None = None
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], set[tuple[str, str]]] = {}  # -> {(job, uid)}
        self._seen: dict[
            tuple[str, str], str
        ] = {}  # (namespace, WeightSource) -> last resourceVersion

    def wait(self, namespace: str, source: str, job: str, uid: str, read: str | None) -> None:
        """Job `job` (`uid`) read WeightSource `source` at resourceVersion `read` and left
        targets waiting."""
        with self._lock:
            now = newer(self._seen.get((namespace, source)), read)
            if not now:
                self._waiting.setdefault((namespace, source), set()).add((job, uid))
        if now and self.wake is not None:
            self.wake((namespace, job, uid))

    def changed(self, namespace: str, source: str, rv: str | None) -> list[str]:
        """WeightSource `source` is now at `rv`: the jobs waiting for it, woken."""
        with self._lock:
            if rv is not None:
                self._seen[(namespace, source)] = rv
            jobs = sorted(self._waiting.pop((namespace, source), set()))
        if self.wake is not None:
            for job, uid in jobs:
                self.wake((namespace, job, uid))
        return [job for job, _ in jobs]

    def forget(self, namespace: str, source: str) -> None:
        with self._lock:
            self._waiting.pop((namespace, source), None)
            self._seen.pop((namespace, source), None)


# The operator's one registry (reconcile.py registers, main.py wires the wake-up).
SOURCES = SourceWaiters()


def idle_targets(
    selected: set[str], assigned: set[str], status: dict[str, Any], settled: tuple[str, ...]
) -> set[str]:
    """Selected targets of a running job with no attempt in hand and no settled entry:
    those that wait for a source (pure)."""
    done = {e["pod"] for e in status.get("targets") or [] if e.get("phase") in settled}
    return selected - assigned - done


class AgentLeaseWatch:
    """List, then watch, the agent Leases (label LEASE_LABEL) of every namespace (or
    of `namespaces`), handing each one's annotations to `seen(namespace, name, annotations)`.
    A list (at the start and after each watch ends) hands every Lease over too, so
    reports written while no watch ran still wake their jobs."""

    def __init__(
        self,
        api: Callable[[], Any],
        seen: Callable[[str, str, dict[str, str] | None], Any],
        namespaces: Sequence[str] = (),
        timeout_s: int = 60,
    ) -> None:
        self.api, self._seen, self.namespaces, self.timeout_s = (
            api,
            seen,
            list(namespaces),
            timeout_s,
        )
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> AgentLeaseWatch:
        scopes: list[str | None] = list(self.namespaces) or [None]
        for ns in scopes:
            t = threading.Thread(
                target=self._run, args=(ns,), name=f"ferry-lease-watch-{ns or 'all'}", daemon=True
            )
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        """The threads end at their next event or watch timeout (they are daemons)."""
        self._stop.set()

    def _run(self, namespace: str | None) -> None:
        from kubernetes import client, watch

        while not self._stop.is_set():
            try:
                coord = client.CoordinationV1Api(self.api())
                if namespace is None:
                    lister: Any = coord.list_lease_for_all_namespaces
                    args: tuple[str, ...] = ()
                else:
                    lister, args = coord.list_namespaced_lease, (namespace,)
                found = json.loads(
                    lister(*args, label_selector=leases.LEASE_LABEL, _preload_content=False).data
                )
                for item in found["items"]:
                    self._hand(item)
                stream = watch.Watch().stream(
                    lister,
                    *args,
                    label_selector=leases.LEASE_LABEL,
                    resource_version=found["metadata"]["resourceVersion"],
                    timeout_seconds=self.timeout_s,
                    _request_timeout=self.timeout_s + 10,
                    deserialize=False,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._hand(event["object"])
            except Exception as exc:  # apiserver away, watch expired (410): list again
                log.debug("agent Lease watch (%s) ended: %s", namespace or "all namespaces", exc)
                self._stop.wait(1.0)

    def _hand(self, lease: dict[str, Any]) -> None:
        meta = lease.get("metadata") or {}
        try:
            self._seen(
                str(meta.get("namespace") or ""),
                str(meta.get("name") or ""),
                meta.get("annotations"),
            )
        except Exception:
            log.exception("agent Lease %s/%s not handled", meta.get("namespace"), meta.get("name"))

"""In-process stand-ins for Ferry agents, for control-plane benchmarks and scale tests.

This is the one simulated part of the control-plane benchmark: everything else
(etcd, kube-apiserver, scheduler, kwok, the operator) is real. A `SimAgent` moves
no bytes and runs no NIXL, but every write it makes goes through the real agent
code: the Lease through `Reporter._renew`, the WeightSource member entry through
`Reporter._apply_entry` (the pod's own field manager), its RefitJob reports through
`JobRunner.write_report` (a `Report`, a merge patch of its own Lease). One process holds many of them
and writes from a thread pool instead of one process per pod. Unlike a real agent,
which watches its own Lease, it learns of its assignment from the bench's one watch
on every agent Lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client as k8s_client

from ferry_agent.k8s.jobs import JobRunner
from ferry_agent.k8s.reporter import Identity, Reporter
from ferry_api.leases import Report

AGENT_PORT = 50051
# The apiserver answers 504 when a write to a contended object cannot land within its
# request timeout, and 429 when flow control sheds it; a real agent's next write
# (progress, or its job runner's next tick) tries again.
TRANSIENT = (429, 504)
RETRIES = 3


class SimAgent:
    def __init__(
        self,
        pod: str,
        namespace: str,
        node: str | None,
        ip: str,
        api: k8s_client.ApiClient,
        lease_seconds: int,
        info: dict[str, Any] | None = None,
    ):
        self.pod = pod
        ident = Identity(pod, namespace, node, f"{ip}:{AGENT_PORT}")
        self.reporter = Reporter(
            ident, lambda: dict(info or {"state": "Empty"}), api, lease_seconds=lease_seconds
        )
        self.jobs = JobRunner(None, ident, api)

    def renew(self) -> None:
        self.reporter._renew()

    def publish(self, weightsource: str) -> None:
        self.reporter._apply_entry(weightsource, self.reporter._entry())

    def report(
        self, uid: str, attempt: int, phase: str, nbytes: int, seconds: float | None = None
    ) -> float:
        """Report on job `uid` as the job runner does; returns the round trip in seconds."""
        report = Report(
            attempt=attempt,
            endpoint=self.reporter.ident.endpoint,
            phase=phase,  # type: ignore[arg-type]
            bytes=nbytes,
            seconds=seconds,
        )
        t = time.monotonic()
        self.jobs.write_report(uid, report)
        return time.monotonic() - t


class Fleet:
    """Many SimAgents, a thread pool for their writes, and a heartbeat (its own pool)
    renewing every Lease each `renew_seconds`.

    `writers` bounds how many reports are in flight at once (each agent writes only its
    own Lease, so they do not contend; the bound keeps one process's threads few)."""

    def __init__(self, writers: int = 8, renew_seconds: float = 5.0):
        self.agents: dict[str, SimAgent] = {}
        self.pool = ThreadPoolExecutor(writers, thread_name_prefix="simagent")
        self.beats = ThreadPoolExecutor(8, thread_name_prefix="simagent-lease")
        self.renew_seconds = renew_seconds
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.errors: list[str] = []
        self.retries = 0

    def add(self, agent: SimAgent) -> None:
        self.agents[agent.pod] = agent

    def each(self, fn: Callable[[SimAgent], Any], pods: Iterable[str] | None = None) -> list[Any]:
        """Run fn for each agent (all, or `pods`) on the pool; returns the results."""
        chosen = [self.agents[p] for p in (pods if pods is not None else self.agents)]
        return list(self.pool.map(fn, chosen))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(self._guard(fn, *args))

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        def guarded() -> Any:
            for attempt in range(RETRIES + 1):
                try:
                    return fn(*args)
                except k8s_client.ApiException as exc:
                    if exc.status in TRANSIENT and attempt < RETRIES:
                        self.retries += 1  # counted in the benchmark's output
                        continue
                    self.errors.append(
                        f"{getattr(fn, '__qualname__', fn)}: {exc.status} {exc.reason}"
                    )
                    raise
                except Exception as exc:  # surfaced by the benchmark, never swallowed
                    self.errors.append(f"{getattr(fn, '__qualname__', fn)}: {exc}")
                    raise

        return guarded

    def start_heartbeat(self) -> None:
        list(self.beats.map(SimAgent.renew, list(self.agents.values())))

        def loop() -> None:
            while not self._stop.wait(self.renew_seconds):
                for a in list(self.agents.values()):
                    if self._stop.is_set():
                        return
                    self.beats.submit(self._guard(a.renew))

        self._beat = threading.Thread(target=loop, name="simagent-heartbeat", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(5)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.beats.shutdown(wait=True, cancel_futures=True)

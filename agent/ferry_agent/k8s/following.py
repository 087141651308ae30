"""RefitJob `version: follow` on the agent: the operator's follow assignment becomes a
Follow subscription (ferry_agent.follow), and what the follower serves goes back onto
this pod's Lease, rate-limited.

The operator writes `follow.ferry.dev/<job uid>` on this pod's Lease (source endpoint,
upstream endpoint, pull options; operator/ferry_operator/handlers/follow.py). The agent
keeps one Follower per assignment and writes `followreport.ferry.dev/<job uid>`
(version served, when, outcome, endpoint) at most once per REPORT_INTERVAL_S, after
the fact: no Lease write is on the per-step path, and a burst of versions costs one
write. The one-shot job runner (jobs.py) reads only `assign.ferry.dev/` keys, so
follow jobs never enter its attempt logic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ferry_api import leases, ssa, times
from ferry_api.leases import FollowAssignment, FollowReport

from ..errors import FerryError
from ..follow import FollowSpec, Outcome, follower_name
from .reporter import Identity

log = logging.getLogger(__name__)

# At most one follow report write per job per this long (the status is asynchronous:
# the operator folds it on its next reconcile).
REPORT_INTERVAL_S = 1.0


def spec_of(
    assignment: FollowAssignment | dict[str, Any], pod: str, by_pod: bool = False
) -> FollowSpec:
    """The Follower for an assignment (raises ValidationError naming the bad field, or
    BadRequest). `by_pod` (cluster mode, mTLS): addresses name the pod too
    (pod@host:port), so the follower dials only that pod's certificate."""
    a = (
        assignment
        if isinstance(assignment, FollowAssignment)
        else FollowAssignment.from_annotation(assignment)
    )

    def address(pod_name: str | None, endpoint: str) -> str:
        return f"{pod_name}@{endpoint}" if by_pod and pod_name else endpoint

    return FollowSpec(
        source=address(a.source, a.source_endpoint),
        upstream=address(a.upstream, a.upstream_endpoint) if a.upstream_endpoint else None,
        name=follower_name(pod),
        timeout_s=float(a.timeout_seconds),
        chunk_bytes=a.chunk_bytes,
        quiesce=a.pause != "none",
        double_buffer=a.pause == "doubleBuffer" and not a.upstream_endpoint,
    )


class Following:
    """This pod's follow assignments, kept as Followers; their reports, throttled."""

    def __init__(
        self,
        agent: Any,
        ident: Identity,
        api: Any,
        report_interval_s: float = REPORT_INTERVAL_S,
        patch: Callable[[dict[str, str | None]], None] | None = None,
    ) -> None:
        self.agent, self.ident, self.api = agent, ident, api
        self.report_interval_s = report_interval_s
        self._patch = patch or self._patch_lease
        self._lock = threading.Lock()
        self._specs: dict[str, FollowSpec] = {}  # job uid -> what we follow for it
        self._reports: dict[str, FollowReport] = {}  # job uid -> report to write
        self._written: dict[str, str] = {}  # job uid -> encoded report last written
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Following:
        self._thread = threading.Thread(
            target=self._write_loop, name="ferry-follow-report", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        with self._lock:
            gone = [self._specs.pop(u) for u in list(self._specs)]
        for spec in gone:
            self.agent.unfollow(spec.name)
        if self._thread is not None:
            self._thread.join(5.0)

    # -- assignments (from the Lease watch) ----------------------------------------
    def saw(self, annotations: dict[str, str]) -> None:
        """The Lease's annotations changed: follow what is assigned, stop what is not.
        Followers start and stop outside the lock (a stopping one may be reporting)."""
        assigned = leases.read(annotations, leases.FOLLOW)
        with self._lock:
            gone = [(u, self._specs.pop(u)) for u in list(self._specs) if u not in assigned]
            for uid, _ in gone:
                self._reports.pop(uid, None)
            start: list[tuple[str, FollowSpec]] = []
            # One follower per pod rank: a second follow job on this pod waits its turn.
            for uid in sorted(assigned)[:1]:
                try:
                    spec = spec_of(
                        assigned[uid],
                        self.ident.pod,
                        by_pod=getattr(self.agent, "tls", None) is not None,
                    )
                except (FerryError, ValidationError, KeyError, TypeError, ValueError) as exc:
                    log.warning("follow assignment %s is not usable: %s", uid, exc)
                    continue
                if self._specs.get(uid) != spec:
                    self._specs[uid] = spec
                    start.append((uid, spec))
        for uid, spec in gone:
            self.agent.unfollow(spec.name)
            try:
                self._patch({leases.FOLLOW_REPORT + uid: None})
            except Exception as exc:  # a report left behind names a job that is gone
                log.info("could not remove follow report %s: %s", uid, exc)
        for uid, spec in start:
            self.agent.follow(spec, on_outcome=lambda o, uid=uid: self._outcome(uid, o))
            with self._lock:
                self._set(uid, self._serving_report(uid))

    # -- reports -------------------------------------------------------------------
    def _serving_report(self, uid: str) -> FollowReport:
        version = self.agent.rank(0).version_info()["version"]
        prev = self._reports.get(uid)
        return FollowReport(
            endpoint=self.ident.endpoint,
            version=version or None,
            ok=True,
            last_refit_time=prev.last_refit_time if prev else None,
        )

    def _outcome(self, uid: str, o: Outcome) -> None:
        with self._lock:
            if uid not in self._specs:
                return
            prev = self._reports.get(uid)
            if o.ok:
                report = FollowReport.model_validate(
                    {
                        "endpoint": self.ident.endpoint,
                        "version": o.version or None,
                        "ok": True,
                        "lastRefitTime": times.now(),
                        "bytes": o.bytes,
                        "seconds": round(o.seconds, 4),
                    }
                )
            else:
                report = FollowReport.model_validate(
                    {
                        "endpoint": self.ident.endpoint,
                        "version": o.version or None,
                        "ok": False,
                        "reason": o.reason or None,
                        "message": o.message or None,
                        "lastRefitTime": prev.last_refit_time if prev else None,
                    }
                )
            self._set(uid, report)

    def _set(self, uid: str, report: FollowReport) -> None:
        self._reports[uid] = report
        self._dirty.set()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            self._dirty.clear()
            with self._lock:
                todo = {u: r.encode() for u, r in self._reports.items() if u in self._specs}
                todo = {u: v for u, v in todo.items() if self._written.get(u) != v}
            if todo:
                try:
                    self._patch({leases.FOLLOW_REPORT + u: v for u, v in todo.items()})
                    self._written.update(todo)
                except Exception as exc:  # the next change (or this retry) writes it
                    log.info("follow report write failed: %s", exc)
                    self._dirty.set()
            self._stop.wait(self.report_interval_s)

    def _patch_lease(self, annotations: dict[str, str | None]) -> None:
        leases.patch(self.api, self.ident.namespace, self.ident.pod, annotations, ssa.AGENT_MANAGER)

"""Operator metrics (prometheus-client), served on /metrics by health.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "ferry_operator_reconciles_total",
    "Reconciles run, by kind and result (ok, invalid, error).",
    ["kind", "result"],
)
RECONCILE_SECONDS = Histogram(
    "ferry_operator_reconcile_duration_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WATCH_CANARY_AGE = Gauge(
    "ferry_operator_watch_canary_age_seconds",
    "Seconds since the operator last saw its own canary Lease through a watch.",
)
CONDITION_TRANSITIONS = Counter(
    "ferry_operator_condition_transitions_total",
    "Condition status or reason changes, by kind, condition type and new status.",
    ["kind", "type", "status"],
)


@contextmanager
def reconcile_timer(kind: str) -> Iterator[dict[str, str]]:
    """Times a reconcile; the body sets outcome['result'] to 'invalid' when it refuses input."""
    outcome = {"result": "ok"}
    start = time.perf_counter()
    try:
        yield outcome
    except Exception:
        outcome["result"] = "error"
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)
        RECONCILES.labels(kind, outcome["result"]).inc()


REFITJOBS = Gauge(
    "ferry_operator_refitjobs",
    "RefitJobs known to this operator, by phase.",
    ["phase"],
)
REFIT_TARGETS = Counter(
    "ferry_operator_refit_targets_total",
    "Targets that finished an attempt, by outcome (Done, Failed) and reason.",
    ["outcome", "reason"],
)
REFIT_BYTES = Counter(
    "ferry_operator_refit_bytes_total",
    "Bytes moved into targets by finished RefitJobs.",
)
REFIT_JOB_THROUGHPUT = Histogram(
    "ferry_operator_refitjob_throughput_gbps",
    "Aggregate throughput of finished RefitJobs (bytes moved / wall time), GB/s.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 200, 400, 800),
)
STALE_REPLICAS = Gauge(
    "ferry_operator_stale_replicas",
    "WeightSource replicas currently Stale (Lease expired or shut down).",
    ["namespace", "weightsource"],
)

_job_phases: dict[str, str] = {}


def observe_job_phase(uid: str, phase: str | None) -> None:
    """Track each job's phase (None: deleted) and refresh the by-phase gauge."""
    if phase is None:
        _job_phases.pop(uid, None)
    else:
        _job_phases[uid] = phase
    for p in ("Pending", "Running", "Succeeded", "Failed"):
        REFITJOBS.labels(p).set(sum(1 for v in _job_phases.values() if v == p))

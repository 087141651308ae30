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

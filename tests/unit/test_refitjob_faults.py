"""Issue 19 (and 18's fold checks): a RefitJob survives what a target's Lease and pod do.

Each test is named after the issue's bullet; all are pure folds over a World.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from ferry_api import leases
from ferry_api.refitjob import RefitJobSpec
from ferry_operator.handlers.refitjob import World, assignments, compute_status, fold

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUNNING = {"phase": "Running", "version": "5", "startTime": "2026-01-01T00:00:00Z"}
INT64_MAX = (1 << 63) - 1


def spec(**kw: object) -> RefitJobSpec:
    return RefitJobSpec.model_validate(
        {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}, **kw}
    )


def source(*pods: str) -> dict:
    return {
        "status": {
            "version": "5",
            "fingerprint": "fp",
            "bytes": 1000,
            "conditions": [{"type": "Ready", "status": "True"}],
            "members": [
                {
                    "pod": p,
                    "state": "Ready",
                    "version": "5",
                    "fingerprint": "fp",
                    "endpoint": f"{p}:1",
                }
                for p in pods
            ],
        }
    }


def ints(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [i for v in value.values() for i in ints(v)]
    if isinstance(value, list):
        return [i for v in value for i in ints(v)]
    return []


def writable(status: dict) -> None:
    """What the apiserver takes: JSON without NaN/Infinity, every integer an int64."""
    json.dumps(status, allow_nan=False)
    assert all(-INT64_MAX - 1 <= i <= INT64_MAX for i in ints(status)), status


# -- One bad report wedges a job and its finalizer ------------------------------------

BAD = json.loads(f'{{"attempt": 1, "phase": "Done", "seconds": Infinity, "bytes": {2**70}}}')


def test_one_bad_report_wedges_a_job_fold_drops_bad_numbers() -> None:
    entry = {"pod": "t0", "source": "s0", "attempts": 1, "phase": "Pulling", "bytes": 10}
    got = fold(entry, BAD)
    assert got == {"pod": "t0", "source": "s0", "attempts": 1, "phase": "Done"}, got
    writable(got)
    assert fold(entry, {**BAD, "seconds": float("nan")}).get("seconds") is None
    assert fold(entry, {**BAD, "bytes": INT64_MAX + 1}).get("bytes") is None


def test_one_bad_report_wedges_a_job_bytes_beyond_the_jobs_total_are_dropped() -> None:
    status = {**RUNNING, "targets": [{"pod": "t0", "source": "s0", "attempts": 1}]}
    w = World(
        source("s0"),
        {"t0": None},
        {"s0", "t0"},
        T0,
        reports={"t0": {"attempt": 1, "phase": "Pulling", "bytes": 10**15}},
    )
    st = compute_status(spec(), status, 1, w).status
    writable(st)
    assert "bytes" not in st["targets"][0] and st["bytesDone"] <= st["bytesTotal"] == 1000


def test_one_bad_report_wedges_a_job_the_status_stays_writable() -> None:
    status = {**RUNNING, "targets": [{"pod": "t0", "source": "s0", "attempts": 1}]}
    w = World(source("s0"), {"t0": None}, {"s0", "t0"}, T0, reports={"t0": BAD})
    d = compute_status(spec(), status, 1, w)
    writable(d.status)
    assert d.status["phase"] == "Succeeded"


def test_one_bad_report_wedges_a_job_counts_are_int64() -> None:
    assert leases.count(2**70) is None and leases.count(INT64_MAX) == INT64_MAX
    assert leases.Report.parse(BAD) == leases.Report(attempt=1, phase="Done")
    assert leases.Report.parse({**BAD, "attempt": 2**64}) is None, "an attempt beyond int64 is none"


# -- An expired Lease spends a retry per reconcile -------------------------------------


def lost_world(now: datetime, retry_at: datetime | None = None) -> World:
    return World(
        source("s0"),
        {"t0": None},
        {"s0"},
        now,
        expired={"t0"},
        retry_at={"t0": retry_at} if retry_at else {},
    )


def test_an_expired_lease_spends_one_retry_per_attempt_not_per_reconcile() -> None:
    status: dict = {
        **RUNNING,
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1, "phase": "Pulling"}],
    }
    for i in range(10):  # ten reconciles, one a second, with the Lease expired all along
        status = compute_status(spec(), status, 1, lost_world(T0 + timedelta(seconds=i))).status
    entry = status["targets"][0]
    assert status["phase"] == "Running", status
    assert entry["attempts"] == 2 and entry["reason"] == "AgentUnavailable", entry


def test_an_expired_lease_is_reassigned_only_after_a_grace_period() -> None:
    status = {
        **RUNNING,
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1, "phase": "Pulling"}],
    }
    grace_ends = T0 + timedelta(seconds=5)
    d = compute_status(spec(), status, 1, lost_world(T0, retry_at=grace_ends))
    assert d.assigned == {} and d.status["targets"] == status["targets"], (
        "untouched within the grace"
    )
    again = compute_status(spec(), d.status, 1, lost_world(T0 + timedelta(seconds=2), grace_ends))
    assert again.assigned == {} and again.status["targets"][0]["attempts"] == 1
    later = compute_status(spec(), again.status, 1, lost_world(grace_ends, grace_ends))
    entry = later.status["targets"][0]
    assert later.assigned == {"t0": ("s0",)} and entry["attempts"] == 2
    assert entry["reason"] == "AgentUnavailable" and "attempt 1" in entry["message"]
    # Fresh again within the grace period: the attempt goes on, no retry spent.
    fresh = World(
        source("s0"),
        {"t0": None},
        {"s0", "t0"},
        T0 + timedelta(seconds=1),
        reports={"t0": {"attempt": 1, "phase": "Done", "bytes": 1000}},
    )
    st = compute_status(spec(), d.status, 1, fresh).status
    assert st["phase"] == "Succeeded" and st["targets"][0]["attempts"] == 1


def test_an_expired_lease_counts_again_once_the_agent_took_the_new_attempt() -> None:
    status = {
        **RUNNING,
        "targets": [{"pod": "t0", "source": "s0", "attempts": 2, "reason": "AgentUnavailable"}],
    }
    w = World(
        source("s0"),
        {"t0": None},
        {"s0", "t0"},
        T0,
        reports={"t0": {"attempt": 2, "phase": "Pulling", "bytes": 1}},
    )
    status = compute_status(spec(), status, 1, w).status
    assert status["targets"][0]["phase"] == "Pulling" and "reason" not in status["targets"][0]
    d = compute_status(spec(), status, 1, lost_world(T0))
    assert d.status["targets"][0]["attempts"] == 3, "a new loss of a taken attempt counts"


# -- A deleted target pod holds the job until its deadline -----------------------------


def test_a_deleted_target_pod_leaves_the_job_and_the_job_completes() -> None:
    status = {
        **RUNNING,
        "targets": [
            {"pod": "t0", "source": "s0", "attempts": 1, "phase": "Done", "bytes": 1000},
            {"pod": "t1", "source": "s0", "attempts": 1, "phase": "Pulling", "bytes": 10},
        ],
    }
    # t1's agent stopped cleanly (its Lease deleted) and its pod is gone.
    d = compute_status(spec(), status, 1, World(source("s0"), {"t0": None}, {"s0", "t0"}, T0))
    st = d.status
    left = st["targets"][1]
    assert left["pod"] == "t1" and left["phase"] == "Left" and left["reason"] == "PodGone", left
    assert "spec.targets" in left["message"]
    assert st["phase"] == "Succeeded" and st["targetsSummary"] == "1/1", st
    complete = next(c for c in st["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True" and "1 left" in complete["message"]
    assert assignments("rj", spec(), st) == {}


def test_a_deleted_target_pod_being_deleted_leaves_with_its_reason() -> None:
    status = {**RUNNING, "targets": [{"pod": "t1", "source": "s0", "attempts": 1}]}
    w = World(source("s0"), {}, {"s0"}, T0, terminating={"t1"})
    entry = compute_status(spec(), status, 1, w).status["targets"][0]
    assert entry["phase"] == "Left" and entry["reason"] == "PodDeleted"


def test_a_left_target_no_longer_folds_reports() -> None:
    left = {"pod": "t1", "source": "s0", "attempts": 1, "phase": "Left", "reason": "PodGone"}
    assert fold(left, {"attempt": 1, "phase": "Done"}) == left


# -- Issue 18: the operator checks what it folds ---------------------------------------


def test_a_report_for_an_attempt_never_assigned_is_ignored() -> None:
    status = {**RUNNING, "targets": [{"pod": "t0", "source": "s0", "attempts": 1}]}
    for forged in ({"attempt": 2, "phase": "Done"}, {"attempt": 0, "phase": "Done"}):
        w = World(source("s0"), {"t0": None}, {"s0", "t0"}, T0, reports={"t0": forged})
        st = compute_status(spec(), status, 1, w).status
        assert st["phase"] == "Running" and "phase" not in st["targets"][0]
    # A report from a pod the job never assigned (not a target) makes no entry.
    w = World(
        source("s0"), {"t0": None}, {"s0", "t0"}, T0, reports={"x": {"attempt": 1, "phase": "Done"}}
    )
    assert [e["pod"] for e in compute_status(spec(), status, 1, w).status["targets"]] == ["t0"]


def test_a_forged_lease_holder_is_ignored() -> None:
    from ferry_operator.kube import agent_leases_of

    def lease(name: str, holder: str, renewed: datetime, ann: dict | None = None) -> dict:
        return {
            "metadata": {"name": name, "annotations": ann or {}},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 10,
                "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }

    report = {leases.REPORT + "u": leases.encode({"attempt": 1, "phase": "Done"})}
    got = agent_leases_of(
        [
            lease("ferry-agent-t0", "t0", T0),
            lease("ferry-agent-evil", "t1", T0, report),  # claims to be t1's
            lease("ferry-agent-t2", "t1", T0, report),  # t2's Lease, holder forged to t1
            lease("ferry-agent-t3", "t3", T0 - timedelta(seconds=30)),
        ],
        T0 + timedelta(seconds=1),
    )
    assert got.live == {"t0"} and got.expired == {"t3"}
    assert set(got.annotations) == {"t0", "t3"}
    # Expired at renew + duration; re-assignable one lease duration later (>= a renewal interval).
    assert got.retry_at["t3"] == T0 - timedelta(seconds=10)


# -- Small one: an upstream's report pruned while a downstream needs its endpoint ------


def test_a_pruned_upstream_report_the_assignment_carries_upstream_endpoints() -> None:
    status = {
        **RUNNING,
        "targets": [
            {"pod": "t0", "source": "s0", "attempts": 1},
            {"pod": "t2", "source": "s0", "attempts": 1, "phase": "Pulling"},
        ],
    }
    w = World(
        source("s0"),
        {"t0": None, "t1": None, "t2": None},
        {"s0", "t0", "t1", "t2"},
        T0,
        reports={"t0": {"attempt": 1, "phase": "Done", "bytes": 1000, "endpoint": "10.0.0.9:7470"}},
    )
    st = compute_status(spec(strategy={"type": "tree", "maxFanOut": 1}), status, 1, w).status
    assert st["targets"][0]["endpoint"] == "10.0.0.9:7470", "the operator keeps what it saw"
    got = assignments("rj", spec(strategy={"type": "tree", "maxFanOut": 1}), st)
    assert got["t1"].upstream == ("t0",) and got["t1"].endpoints == {"t0": "10.0.0.9:7470"}
    assert "t0" not in got, "t0 is Done: nothing left in hand"

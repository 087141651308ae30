"""RefitJob status and assignment decisions (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ferry_api.refitjob import RefitJobSpec
from ferry_operator.handlers.refitjob import World, compute_status, target_phase

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**kw: object) -> RefitJobSpec:
    return RefitJobSpec.model_validate(
        {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}, **kw}
    )


def source(*pods: str, version: str = "5") -> dict:
    return {
        "status": {
            "version": version,
            "fingerprint": "fp",
            "bytes": 1000,
            "conditions": [{"type": "Ready", "status": "True"}],
            "members": [
                {
                    "pod": p,
                    "state": "Ready",
                    "version": version,
                    "fingerprint": "fp",
                    "endpoint": f"{p}:1",
                }
                for p in pods
            ],
        }
    }


def world(
    src: dict | None, targets: list[str], now: datetime = T0, live: set[str] | None = None
) -> World:
    pods = {t: None for t in targets}
    members = {m["pod"] for m in ((src or {}).get("status") or {}).get("members", [])}
    return World(src, pods, members | set(targets) if live is None else live, now)


def cond(st: dict, t: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == t)


def test_source_missing_waits() -> None:
    d = compute_status(spec(), {}, 1, world(None, ["t0"]))
    assert (
        d.status["phase"] == "Pending"
        and cond(d.status, "Progressing")["reason"] == "SourceNotFound"
    )
    assert "version" not in d.status and d.status["startTime"] == "2026-01-01T00:00:00Z"


def test_assigns_every_target_spread_over_ready_sources() -> None:
    d = compute_status(spec(), {}, 1, world(source("s0", "s1"), ["t0", "t1", "t2", "t3"]))
    st = d.status
    assert st["phase"] == "Running" and st["version"] == "5"
    assert [e["attempts"] for e in st["targets"]] == [1, 1, 1, 1]
    assert sorted(e["source"] for e in st["targets"]) == ["s0", "s0", "s1", "s1"]
    assert cond(st, "Progressing")["status"] == "True"
    assert st["targetsSummary"] == "0/4" and st["bytesTotal"] == 4000


def test_stale_or_other_version_sources_are_not_used() -> None:
    src = source("s0", "s1")
    d = compute_status(spec(), {}, 1, world(src, ["t0"], live={"s1", "t0"}))
    assert d.status["targets"][0]["source"] == "s1"
    d = compute_status(spec(version="4"), {}, 1, world(src, ["t0"]))
    assert "targets" not in d.status, "no source holds version 4"


def test_already_assigned_target_is_not_reassigned() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1}],
    }
    d = compute_status(spec(), status, 1, world(source("s0", "s1"), ["t0"]))
    assert d.assigned == {} and d.status["targets"] == [
        {"pod": "t0", "source": "s0", "attempts": 1}
    ]


def test_failed_attempt_retries_on_another_source() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [
            {
                "pod": "t0",
                "source": "s0",
                "attempts": 1,
                "phase": "Failed",
                "reason": "PeerUnavailable",
            }
        ],
    }
    d = compute_status(spec(), status, 1, world(source("s0", "s1"), ["t0"]))
    assert d.assigned == {"t0": ("s1",)}
    # A new attempt has no phase yet; the last failure's reason stays until the agent reports.
    assert d.status["targets"] == [
        {"pod": "t0", "source": "s1", "attempts": 2, "reason": "PeerUnavailable"}
    ]
    assert target_phase(d.status["targets"][0], 3) == "Assigned"


def test_backoff_exhausted_fails_job_with_reason_once_others_finish() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [
            {
                "pod": "bad",
                "source": "s1",
                "attempts": 2,
                "phase": "Failed",
                "reason": "LayoutMismatch",
                "message": "w: dtype",
            },
            {"pod": "good", "source": "s0", "attempts": 1, "phase": "Done", "bytes": 1000},
        ],
    }
    d = compute_status(
        spec(backoffLimit=1),
        status,
        1,
        world(source("s0", "s1"), ["bad", "good"], now=T0 + timedelta(seconds=4)),
    )
    st = d.status
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "LayoutMismatch"
    assert "bad: LayoutMismatch" in cond(st, "Failed")["message"]
    assert st["completionTime"] == "2026-01-01T00:00:04Z" and st["targetsSummary"] == "1/2"


def test_all_done_completes_with_throughput() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [
            {"pod": f"t{i}", "source": "s0", "attempts": 1, "phase": "Done", "bytes": 2_000_000_000}
            for i in range(2)
        ],
    }
    d = compute_status(
        spec(), status, 1, world(source("s0"), ["t0", "t1"], now=T0 + timedelta(seconds=2))
    )
    st = d.status
    assert st["phase"] == "Succeeded" and cond(st, "Complete")["status"] == "True"
    assert st["throughput"] == "2.00GB/s" and st["bytesDone"] == 4_000_000_000
    again = compute_status(
        spec(), st, 1, world(source("s0"), ["t0", "t1"], now=T0 + timedelta(hours=1))
    )
    assert (
        again.status["phase"] == "Succeeded"
        and again.status["completionTime"] == st["completionTime"]
    )
    assert again.status["throughput"] == "2.00GB/s", "a finished job's throughput is frozen"


def test_deadline_exceeded() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1}],
    }
    d = compute_status(
        spec(timeoutSeconds=10),
        status,
        1,
        world(source("s0"), ["t0"], now=T0 + timedelta(seconds=11)),
    )
    assert (
        d.status["phase"] == "Failed" and cond(d.status, "Failed")["reason"] == "DeadlineExceeded"
    )


def test_ttl_after_finished_deletes() -> None:
    status = {
        "phase": "Succeeded",
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T00:00:05Z",
        "conditions": [],
    }
    assert not compute_status(
        spec(ttlSecondsAfterFinished=60),
        status,
        1,
        world(source("s0"), [], now=T0 + timedelta(seconds=30)),
    ).delete
    assert compute_status(
        spec(ttlSecondsAfterFinished=60),
        status,
        1,
        world(source("s0"), [], now=T0 + timedelta(seconds=66)),
    ).delete
    assert not compute_status(
        spec(), status, 1, world(source("s0"), [], now=T0 + timedelta(days=9))
    ).delete


def test_target_phase_from_shared_entry() -> None:
    assert target_phase({}, 3) == "Pending"
    assert target_phase({"attempts": 2, "reason": "PeerUnavailable"}, 3) == "Assigned"
    assert target_phase({"attempts": 2, "phase": "Pulling"}, 3) == "Pulling"
    assert target_phase({"attempts": 2, "phase": "Failed"}, 3) == "Retry"
    assert target_phase({"attempts": 4, "phase": "Failed"}, 3) == "Failed"


def test_tree_relays_through_finished_targets() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [
            {"pod": "t0", "source": "s0", "attempts": 1, "phase": "Done", "endpoint": "t0:1"}
        ],
    }
    d = compute_status(
        spec(strategy={"type": "tree", "maxFanOut": 1}),
        status,
        1,
        world(source("s0"), ["t0", "t1", "t2"]),
    )
    assert sorted(d.assigned.values()) == [("s0",), ("t0",)]


def test_target_whose_agent_lease_expired_is_retried_then_failed() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1, "phase": "Pulling"}],
    }
    w = World(source("s0"), {"t0": None}, {"s0"}, T0, expired={"t0"})
    d = compute_status(spec(), status, 1, w)
    assert d.assigned == {"t0": ("s0",)} and d.status["targets"][0]["attempts"] == 2
    status["targets"][0].update(attempts=4)
    d = compute_status(spec(), status, 1, w)
    assert (
        d.status["phase"] == "Failed" and cond(d.status, "Failed")["reason"] == "AgentUnavailable"
    )


def test_agent_not_started_yet_is_waited_for() -> None:
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [{"pod": "t0", "source": "s0", "attempts": 1}],
    }
    w = World(source("s0"), {"t0": None}, {"s0"}, T0)  # no lease at all for t0
    assert compute_status(spec(), status, 1, w).assigned == {}


def test_status_stays_compact_at_1000_targets() -> None:
    import json

    names = [f"inference-{i:04d}" for i in range(1000)]
    status = {
        "phase": "Running",
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
        "targets": [
            {
                "pod": n,
                "source": "trainer-0",
                "attempts": 1,
                "phase": "Pulling",
                "bytes": 123456789012,
            }
            for n in names
        ],
    }
    d = compute_status(spec(), status, 1, world(source("s0"), names))
    size = len(json.dumps(d.status))
    assert size < 200_000, f"{size} bytes: far below etcd's 1.5 MB limit is the goal"


RUNNING = {"phase": "Running", "version": "5", "startTime": "2026-01-01T00:00:00Z"}


def test_reports_on_leases_are_folded_into_entries() -> None:
    status = {
        **RUNNING,
        "targets": [
            {"pod": "t0", "source": "s0", "attempts": 1},
            {"pod": "t1", "source": "s0", "attempts": 1},
        ],
    }
    w = world(source("s0"), ["t0", "t1"])
    w.reports.update(
        {
            "t0": {
                "attempt": 1,
                "phase": "Done",
                "bytes": 1000,
                "seconds": 0.5,
                "endpoint": "t0:1",
            },
            "t1": {"attempt": 1, "phase": "Pulling", "bytes": 400},
        }
    )
    st = compute_status(spec(), status, 1, w).status
    assert st["targets"] == [
        {
            "pod": "t0",
            "source": "s0",
            "attempts": 1,
            "phase": "Done",
            "bytes": 1000,
            "seconds": 0.5,
            "endpoint": "t0:1",
        },
        {"pod": "t1", "source": "s0", "attempts": 1, "phase": "Pulling", "bytes": 400},
    ]
    assert st["bytesDone"] == 1400 and st["targetsSummary"] == "1/2"


def test_a_report_cannot_reopen_skip_or_corrupt_an_entry() -> None:
    from ferry_operator.handlers.refitjob import fold

    done = {"pod": "t0", "source": "s0", "attempts": 2, "phase": "Done", "bytes": 9}
    assert fold(done, {"attempt": 2, "phase": "Pulling", "bytes": 1}) == done, (
        "a finished attempt stays"
    )
    assert fold(done, {"attempt": 1, "phase": "Failed"}) == done, "an older attempt's report"
    assert fold(done, {"attempt": 3, "phase": "Pulling"}) == done, "an attempt never assigned"
    pulling = {
        "pod": "t0",
        "source": "s0",
        "attempts": 2,
        "phase": "Pulling",
        "bytes": 3,
        "reason": "PeerUnavailable",
        "message": "gone",
    }
    for junk in (
        {"attempt": "2", "phase": "Done"},
        {"attempt": True, "phase": "Done"},
        {"attempt": 2, "phase": "Exploded"},
        {"attempt": 2},
    ):
        assert fold(pulling, junk) == pulling
    got = fold(
        pulling,
        {
            "attempt": 2,
            "phase": "Done",
            "bytes": -5,
            "seconds": "fast",
            "reason": "x" * 500,
            "endpoint": "t0:1",
        },
    )
    # A new outcome drops the last failure's reason and the progress; bad numbers are left out,
    # long text is cut to the CRD's limit; the endpoint is kept (a downstream's assignment).
    assert got == {
        "pod": "t0",
        "source": "s0",
        "attempts": 2,
        "phase": "Done",
        "reason": "x" * 128,
        "endpoint": "t0:1",
    }


def test_assignments_are_the_attempts_in_hand_while_the_job_runs() -> None:
    from ferry_operator.handlers.refitjob import assignments

    targets = [
        {"pod": "a", "source": "s0", "attempts": 1},
        {"pod": "b", "source": "a", "attempts": 1, "phase": "Pulling"},
        {"pod": "c", "source": "s0", "attempts": 1, "phase": "Done"},
        {"pod": "d", "source": "s0", "attempts": 1, "phase": "Failed"},
    ]
    got = assignments("rj", spec(), {**RUNNING, "targets": targets})
    assert sorted(got) == ["a", "b"]
    assert got["b"].wire() == {
        "job": "rj",
        "attempt": 1,
        "source": "a",
        "version": "5",
        "startTime": RUNNING["startTime"],
        "spec": spec().wire(),
    }
    assert assignments("rj", spec(), {**RUNNING, "phase": "Failed", "targets": targets}) == {}


def test_rate_units() -> None:
    from ferry_operator.handlers.refitjob import rate

    assert rate(12.345e9) == "12.35GB/s" and rate(8.5e8) == "850.0MB/s" and rate(2e6) == "2.0MB/s"

"""The job runner's decision (ferry_agent.k8s.job_decision.decide), pure: what this agent starts,
cancels, fails or prunes next, given its Lease's assignments and reports and what runs."""

from __future__ import annotations

from ferry_agent.k8s.job_decision import Fail, Running, decide
from ferry_api import leases

SPEC = {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"app": "inference"}}}


def assign(
    uid: str, attempt: int, start: str = "2026-01-01T00:00:00Z", **kw: object
) -> dict[str, str]:
    value = {
        "job": f"job-{uid}",
        "attempt": attempt,
        "source": "s0",
        "version": "5",
        "startTime": start,
        "spec": SPEC,
        **kw,
    }
    return {leases.ASSIGN + uid: leases.encode(value)}


def report(uid: str, attempt: int, phase: str, **kw: object) -> dict[str, str]:
    return {leases.REPORT + uid: leases.encode({"attempt": attempt, "phase": phase, **kw})}


def test_a_new_assignment_starts_with_its_spec_validated_by_the_api_model() -> None:
    nxt = decide(assign("a", 1), None, {}, [])
    assert nxt.start is not None and nxt.start[0] == "a" and not nxt.cancel and nxt.fail == ()
    job = nxt.start[1]
    assert job.attempt == 1 and job.upstream == ("s0",)
    assert job.spec.pause.timeout_seconds == 30 and job.spec.strategy.chunk_bytes == 64 << 20, (
        "API defaults"
    )
    assert nxt.seen == {"a": 1}


def test_the_oldest_job_starts_first_and_one_at_a_time() -> None:
    ann = assign("late", 1, "2026-01-01T00:00:09Z") | assign("early", 1, "2026-01-01T00:00:01Z")
    nxt = decide(ann, None, {}, [])
    assert nxt.start is not None and nxt.start[0] == "early"
    assert decide(ann, Running("early", 1), nxt.seen, []).start is None, "one attempt at a time"


def test_a_running_attempt_is_cancelled_when_its_assignment_goes_or_moves_on() -> None:
    assert decide({}, Running("a", 1), {"a": 1}, []).cancel, "job ended or deleted"
    assert decide(assign("a", 2), Running("a", 1), {"a": 1}, []).cancel, "re-assigned"
    same = decide(assign("a", 1), Running("a", 1), {"a": 1}, [])
    assert not same.cancel and same.start is None


def test_an_attempt_answered_or_already_taken_is_not_started_again() -> None:
    assert decide(assign("a", 1) | report("a", 1, "Done"), None, {}, []).start is None
    assert decide(assign("a", 1), None, {"a": 1}, []).start is None
    retry = decide(assign("a", 2) | report("a", 1, "Failed"), None, {"a": 1}, [])
    assert retry.start is not None and retry.start[1].attempt == 2


def test_an_attempt_left_pulling_by_a_previous_run_is_failed_once() -> None:
    ann = (
        assign("a", 1) | report("a", 1, "Pulling", bytes=5) | assign("b", 1, "2026-01-01T00:00:05Z")
    )
    nxt = decide(ann, None, {}, [])
    assert nxt.fail == (
        Fail(
            "a",
            1,
            "AgentRestarted",
            "the agent restarted during this attempt; its slabs hold no version",
        ),
    )
    assert nxt.start is not None and nxt.start[0] == "b", "the next job still starts"
    assert decide(ann, None, nxt.seen, []).fail == (), "failed once"


def test_an_invalid_assignment_fails_naming_the_field() -> None:
    nxt = decide(assign("a", 1, spec={"sourceRef": {"name": "src"}}), None, {}, [])
    assert nxt.start is None and len(nxt.fail) == 1
    assert nxt.fail[0].reason == "InvalidAssignment" and "spec.targets" in nxt.fail[0].message
    assert decide(assign("a", 0), None, {}, []).fail == (), "no attempt number: nothing to answer"


def test_a_bad_report_on_the_lease_does_not_stop_the_runner() -> None:
    ann = assign("a", 2) | {leases.REPORT + "a": '{"attempt":1,"phase":"Done","seconds":Infinity}'}
    nxt = decide(ann, None, {}, [])
    assert nxt.start is not None and nxt.start[1].attempt == 2


def test_reports_beyond_the_newest_kept_are_pruned_oldest_first() -> None:
    ann: dict[str, str] = {}
    for i in range(10):
        ann |= report(f"j{i}", 1, "Done")
    finished = [f"j{i}" for i in range(10)]
    assert decide(ann, None, {}, finished, keep=8).prune == ("j0", "j1")
    # An assigned job's report and the running one's are never pruned.
    assert decide(ann | assign("j0", 2), Running("j1", 1), {}, finished, keep=8).prune == ()

"""The operator wakes a RefitJob on a target's final report (wakeups.py)."""

from __future__ import annotations

import threading

from ferry_api import leases
from ferry_operator import wakeups


def ann(attempt=1, phase="Done", assigned_attempt=1):  # type: ignore[no-untyped-def]
    return {
        leases.ASSIGN + "u1": leases.encode({"job": "step-3", "attempt": assigned_attempt}),
        leases.REPORT + "u1": leases.encode({"attempt": attempt, "phase": phase}),
    }


def test_a_final_report_on_the_assigned_attempt_wakes_its_job_once():
    seen: set = set()
    assert wakeups.finished_jobs(ann(), seen) == {"u1": "step-3"}
    assert wakeups.finished_jobs(ann(), seen) == {}  # a renewal of the same Lease: no wake-up
    assert wakeups.finished_jobs(ann(phase="Pulling"), set()) == {}
    assert wakeups.finished_jobs(ann(attempt=1, assigned_attempt=2), set()) == {}  # an old attempt
    follow_only = {leases.FOLLOW + "u2": "{}", leases.FOLLOW_REPORT + "u2": '{"version": "1"}'}
    assert wakeups.finished_jobs(follow_only, set()) == {}


def test_each_targets_final_report_wakes_the_job():
    """Three targets report the same attempt of one job Done: each Lease's report wakes
    it (keyed by the first alone, the last target's report waited for the timer)."""
    seen: set = set()
    for pod in ("ns/ferry-agent-a", "ns/ferry-agent-b", "ns/ferry-agent-c"):
        assert wakeups.finished_jobs(ann(), seen, pod) == {"u1": "step-3"}
    assert wakeups.finished_jobs(ann(), seen, "ns/ferry-agent-b") == {}


def test_reports_during_a_reconcile_coalesce_into_one_more_pass():
    calls, inside, release = [], threading.Event(), threading.Event()

    def slow(key):  # type: ignore[no-untyped-def]
        calls.append(key)
        if len(calls) == 1:
            inside.set()
            release.wait(5)

    c = wakeups.Coalescer(slow)
    t = threading.Thread(target=c, args=("job",))
    t.start()
    inside.wait(5)
    for _ in range(10):
        c("job")  # ten reports while the first pass runs
    release.set()
    t.join(5)
    assert calls == ["job", "job"]


def test_report_wakeups_reconcile_each_finished_job_once_off_the_watch_thread():
    woke, done = [], threading.Event()

    def reconcile(key):  # type: ignore[no-untyped-def]
        woke.append((key, threading.current_thread().name))
        done.set()

    w = wakeups.ReportWakeups(reconcile)
    try:
        assert w.seen("ns", "ferry-agent-a", ann()) == ["step-3"]
        assert w.seen("ns", "ferry-agent-a", ann()) == []  # the same report again (a Lease renewal)
        assert w.seen("ns", "ferry-agent-a", ann(phase="Pulling")) == []
        assert done.wait(5)
    finally:
        w.close()
    assert [k for k, _ in woke] == [("ns", "step-3", "u1")]
    assert woke[0][1].startswith("ferry-wakeup")


def test_a_job_waiting_for_its_source_wakes_on_the_sources_next_change():
    woke: list = []
    w = wakeups.SourceWaiters()
    w.wake = woke.append
    w.changed("ns", "policy", "10")
    w.wait("ns", "policy", "step-4", "u4", read="10")  # read the latest: waits
    assert woke == []
    assert w.changed("ns", "other", "11") == []
    assert w.changed("ns", "policy", "12") == ["step-4"] and woke == [("ns", "step-4", "u4")]
    assert (
        w.changed("ns", "policy", "13") == []
    )  # woken once; a reconcile that still waits registers again
    # A change that landed between the job's read and its wait: woken at once.
    w.wait("ns", "policy", "step-5", "u5", read="12")
    assert woke[-1] == ("ns", "step-5", "u5")


def test_resource_versions_compare_as_revisions():
    assert wakeups.newer("12", "9") and not wakeups.newer("9", "12") and not wakeups.newer("9", "9")
    assert wakeups.newer("b", "a") and not wakeups.newer(None, "3") and wakeups.newer("3", None)


def test_idle_targets_are_selected_without_an_attempt_in_hand_or_a_settled_entry():
    status = {"targets": [{"pod": "a", "phase": "Done"}, {"pod": "b", "attempts": 1}]}
    assert wakeups.idle_targets({"a", "b", "c"}, {"b"}, status, ("Done", "Failed", "Left")) == {"c"}

"""kubectl ferry: the pure parts (units, selector parsing, status tables, progress)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ferry_operator.kubectl.progress import (
    Rates,
    bar,
    final_line,
    frame,
    job_view,
    outcome,
    plain_updates,
    redraw,
)
from ferry_operator.kubectl.selector import SelectorError, parse_selector
from ferry_operator.kubectl.tables import job_reason, status_lines, table
from ferry_operator.kubectl.units import fmt_age, fmt_bytes, fmt_duration, fmt_rate, parse_quantity

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def stamp(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_units() -> None:
    assert fmt_bytes(0) == "0 B" and fmt_bytes(999) == "999 B"
    assert fmt_bytes(25_165_824) == "25.2 MB" and fmt_bytes(3e12) == "3.0 TB"
    assert (
        fmt_rate(12.3e9) == "12.30 GB/s" and fmt_rate(4e6) == "4.0 MB/s" and fmt_rate(None) == "-"
    )
    assert fmt_duration(5) == "5s" and fmt_duration(65) == "1m05s" and fmt_duration(7380) == "2h03m"
    assert fmt_duration(None) == "-"
    assert fmt_age(stamp(30), NOW) == "30s" and fmt_age(stamp(600), NOW) == "10m"
    assert fmt_age(stamp(5 * 3600), NOW) == "5h" and fmt_age(stamp(3 * 86400), NOW) == "3d"
    assert parse_quantity("1Mi") == 1 << 20 and parse_quantity("64Mi") == 64 << 20
    assert parse_quantity("1048576") == 1 << 20 and parse_quantity("2G") == 2 * 10**9
    with pytest.raises(ValueError, match="1Mi"):
        parse_quantity("lots")


def test_selector_forms() -> None:
    assert parse_selector("app=inference") == {"matchLabels": {"app": "inference"}}
    got = parse_selector("app==x, tier in (a, b),env notin (dev),!canary,gpu,zone!=z1")
    assert got["matchLabels"] == {"app": "x"}
    assert got["matchExpressions"] == [
        {"key": "tier", "operator": "In", "values": ["a", "b"]},
        {"key": "env", "operator": "NotIn", "values": ["dev"]},
        {"key": "canary", "operator": "DoesNotExist"},
        {"key": "gpu", "operator": "Exists"},
        {"key": "zone", "operator": "NotIn", "values": ["z1"]},
    ]
    assert parse_selector("ferry.dev/role=target") == {"matchLabels": {"ferry.dev/role": "target"}}


@pytest.mark.parametrize("bad", ["", "a=b,,c=d", "a in ()", "a=1,a=2", "a > 3"])
def test_selector_errors_name_the_problem(bad: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(bad)


def test_table_aligns_columns() -> None:
    assert table(["A", "LONGER"], [["xxxx", "1"], ["y", "22"]]) == [
        "A      LONGER",
        "xxxx   1",
        "y      22",
    ]


def ws(name: str = "policy", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": stamp(300)},
        "spec": {"model": {"name": "tiny-llama"}},
        "status": status,
    }


def rj(name: str = "refit", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": stamp(90)},
        "spec": {"sourceRef": {"name": "policy"}, "version": "latest", "timeoutSeconds": 120},
        "status": status,
    }


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_status_tables_show_what_matters() -> None:
    sources = [
        ws(
            version="7",
            readySummary="2/3",
            size="24.0MiB",
            members=[
                {"pod": "t-0", "state": "Ready"},
                {"pod": "t-1", "state": "Ready"},
                {"pod": "t-2", "state": "Stale"},
            ],
            conditions=[
                cond("Ready", "True", "ReplicasReady"),
                cond("Degraded", "True", "ReplicasStale"),
            ],
        )
    ]
    jobs = [
        rj(
            "ok",
            phase="Running",
            version="7",
            targetsSummary="1/3",
            bytesTotal=300,
            bytesDone=150,
            throughput="1.20GB/s",
        ),
        rj(
            "bad",
            phase="Failed",
            version="7",
            targetsSummary="2/3",
            conditions=[cond("Failed", "True", "LayoutMismatch", "1/3 targets failed")],
        ),
    ]
    caches = [
        {
            "metadata": {"name": "compile", "namespace": "ml", "creationTimestamp": stamp(30)},
            "spec": {"kinds": ["triton", "torch-compile"]},
            "status": {
                "manifestId": "sha256:" + "ab" * 32,
                "bytes": 5_000_000,
                "installed": 2,
                "targets": 3,
                "trust": "Signed",
                "failures": [{"pod": "i-9", "reason": "X"}],
            },
        }
    ]
    lines = status_lines(
        {"weightsources": sources, "refitjobs": jobs, "artifactcaches": caches}, NOW, "ml"
    )
    text = "\n".join(lines)
    src = next(line for line in lines if line.startswith("policy"))
    assert src.split() == [
        "policy",
        "tiny-llama",
        "7",
        "2/3",
        "24.0MiB",
        "t-2",
        "Degraded:ReplicasStale",
        "5m",
    ]
    ok = next(line for line in lines if line.startswith("ok "))
    assert ok.split() == ["ok", "policy", "7", "Running", "1/3", "50%", "1.20GB/s", "90s", "-"]
    bad = next(line for line in lines if line.startswith("bad "))
    assert bad.split()[-1] == "LayoutMismatch" and "Failed" in bad
    cache = next(line for line in lines if line.startswith("compile"))
    assert cache.split() == [
        "compile",
        "triton,torch-compile",
        "ab" * 6,
        "5.0MB",
        "2/3",
        "Signed",
        "i-9",
        "30s",
    ]
    assert "NAMESPACE" not in text
    every = status_lines({"weightsources": sources}, NOW, None)
    assert every[1].startswith("NAMESPACE") and every[2].startswith("ml ")
    assert "No RefitJobs in any namespace." in every


def test_job_reason_for_stuck_and_retrying_jobs() -> None:
    assert (
        job_reason(rj(conditions=[cond("Progressing", "False", "SourceNotFound")]))
        == "SourceNotFound"
    )
    assert (
        job_reason(
            rj(phase="Running", targets=[{"pod": "a", "phase": "Failed", "reason": "SourceStale"}])
        )
        == "Retrying:SourceStale"
    )
    assert (
        job_reason(rj(phase="Succeeded", conditions=[cond("Progressing", "False", "Finished")]))
        == ""
    )


def running(t_bytes: dict[str, int], total: int = 300, **extra: Any) -> dict[str, Any]:
    return rj(
        phase="Running",
        version="7",
        startTime=stamp(10),
        bytesTotal=total,
        targetsSummary=f"{sum(b >= total // 3 for b in t_bytes.values())}/3",
        targets=[
            {"pod": p, "phase": "Pulling", "source": "trainer-0", "bytes": b, "attempts": 1}
            for p, b in t_bytes.items()
        ],
        **extra,
    )


def test_rates_come_from_successive_observations() -> None:
    r = Rates(window_s=5)
    r.observe("a", 0.0, 0)
    assert r.rate("a") is None
    for t in range(1, 11):
        r.observe("a", float(t), t * 1000)
    assert r.rate("a") == pytest.approx(1000)
    r.observe("a", 11.0, 0)  # a retry starts from zero
    assert r.rate("a") is None


def test_a_target_that_reported_nothing_yet_has_no_rate() -> None:
    rates = Rates()
    job_view(running({"i-0": 0}), rates, 0.0, NOW)
    (t,) = job_view(running({"i-0": 0}), rates, 3.0, NOW).targets
    assert t.rate is None and t.eta is None


def test_job_view_rates_eta_and_percentages() -> None:
    rates = Rates()
    job_view(running({"i-0": 0, "i-1": 0}), rates, 0.0, NOW)
    jv = job_view(running({"i-0": 50, "i-1": 20}), rates, 2.0, NOW)
    a, b = jv.targets
    assert (a.pod, a.total, a.rate, a.eta) == ("i-0", 100, 25.0, 2.0)
    assert b.rate == 10.0 and b.eta == 8.0
    # The job's rate is its average since startTime (10 s ago), not the sum of windows.
    assert jv.count == 3 and jv.bytes == 70 and jv.rate == 7.0
    assert jv.eta == pytest.approx(230 / 7) and jv.elapsed == 10.0 and jv.outcome is None
    lines = frame(jv)
    assert lines[0].startswith("refitjob/refit  policy@7  Running  0/3 targets  23%")
    assert "[############............]" in lines[1] and " 50%" in lines[1] and "ETA 2s" in lines[1]
    assert "Pulling <- trainer-0" in lines[1]
    assert lines[-1] == "1 more target(s) not assigned yet"


def test_done_targets_use_their_own_duration_and_count_full_size() -> None:
    obj = running({"i-0": 0})
    obj["status"]["targets"][0].update(phase="Done", bytes=90, seconds=3.0)
    (t,) = job_view(obj, Rates(), 0.0, NOW).targets
    assert t.bytes == 100 and t.rate == pytest.approx(100 / 3) and t.eta is None


def test_outcome_from_conditions() -> None:
    assert outcome(rj(conditions=[cond("Complete", "True", "AllTargetsDone")]))[0] == "Complete"
    assert outcome(
        rj(phase="Failed", conditions=[cond("Failed", "True", "DeadlineExceeded", "late")])
    ) == ("Failed", "DeadlineExceeded", "late")
    assert outcome(rj(phase="Running"))[0] is None


def test_final_lines() -> None:
    done = rj(
        phase="Succeeded",
        version="7",
        startTime=stamp(10),
        completionTime=stamp(0),
        bytesTotal=300,
        targetsSummary="3/3",
        targets=[{"pod": f"i-{i}", "phase": "Done", "bytes": 100, "seconds": 5} for i in range(3)],
        conditions=[cond("Complete", "True", "AllTargetsDone")],
    )
    assert (
        final_line(job_view(done, Rates(), 0.0, NOW))
        == "refitjob/refit Complete: 3/3 targets hold 7, 300 B in 10s (30 B/s)"
    )
    failed = rj(
        phase="Failed", conditions=[cond("Failed", "True", "LayoutMismatch", "i-2: dtype differs")]
    )
    assert (
        final_line(job_view(failed, Rates(), 0.0, NOW))
        == "refitjob/refit Failed (LayoutMismatch): i-2: dtype differs"
    )


def test_plain_updates_print_only_changes() -> None:
    rates, seen = Rates(), {}
    first = plain_updates(seen, job_view(running({"i-0": 10, "i-1": 0}), rates, 0.0, NOW))
    assert len(first) == 3 and first[0].startswith("refitjob/refit")
    assert plain_updates(seen, job_view(running({"i-0": 10, "i-1": 0}), rates, 1.0, NOW)) == []
    moved = plain_updates(seen, job_view(running({"i-0": 40, "i-1": 0}), rates, 2.0, NOW))
    assert len(moved) == 2 and " 13%" in moved[0], "the job's percentage moved too"
    assert moved[1].startswith("i-0") and " 40%" in moved[1]
    assert "[" not in moved[1], "no bars in logs"


def test_redraw_moves_up_and_clears() -> None:
    assert redraw(0, ["a", "b"], 80) == "\x1b[2Ka\n\x1b[2Kb\n\x1b[J"
    assert redraw(2, ["x" * 100], 10).startswith("\x1b[2F\x1b[2K" + "x" * 9 + "\n")


def test_bar_bounds() -> None:
    assert bar(0, 4) == "[....]" and bar(0.5, 4) == "[##..]" and bar(2, 4) == "[####]"

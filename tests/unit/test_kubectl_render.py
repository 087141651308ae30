"""kubectl ferry: the pure parts (units, selector parsing, status tables, progress)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ferry_api.artifactcache import ArtifactCache
from ferry_api.objects import ObjectInvalid, read
from ferry_api.refitjob import RefitJob
from ferry_api.weightsource import WeightSource
from ferry_kubectl.progress import (
    Rates,
    bar,
    final_line,
    frame,
    job_view,
    outcome,
    plain_updates,
    redraw,
)
from ferry_kubectl.selector import SelectorError, parse_selector
from ferry_kubectl.tables import job_reason, status_lines, table
from ferry_kubectl.units import fmt_age, fmt_bytes, fmt_duration, fmt_rate, parse_quantity
from tests.api_objects import SELECTOR, T0, cond, served

NOW = T0


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
    spec = {"model": {"name": "tiny-llama"}, "selector": {"matchLabels": {"app": "trainer"}}}
    return served(WeightSource, name, spec, status, created=NOW - timedelta(seconds=300))


def rj(name: str = "refit", **status: Any) -> dict[str, Any]:
    spec = {
        "sourceRef": {"name": "policy"},
        "targets": SELECTOR,
        "version": "latest",
        "timeoutSeconds": 120,
    }
    return served(RefitJob, name, spec, status, created=NOW - timedelta(seconds=90))


def job(name: str = "refit", **status: Any) -> Any:
    """rj(...) as the plugin reads it."""
    return read(RefitJob, rj(name, **status))


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
    identity = {
        "model": "m",
        "framework": "vllm",
        "frameworkVersion": "0.11",
        "torch": "2.9",
        "cuda": "13.0",
        "triton": "3.5",
        "gpuArch": "sm_90",
        "compileConfigDigest": "sha256:" + "0" * 64,
    }
    caches = [
        served(
            ArtifactCache,
            "compile",
            {
                "identity": identity,
                "kinds": ["triton", "torch-compile"],
                "sources": SELECTOR,
                "targets": {"matchLabels": {"app": "new"}},
                "trust": {"secretRef": "key"},
            },
            {
                "manifestId": "sha256:" + "ab" * 32,
                "bytes": 5_000_000,
                "installed": 2,
                "targets": 3,
                "trust": "Signed",
                "failures": [{"pod": "i-9", "reason": "X"}],
            },
            created=NOW - timedelta(seconds=30),
        )
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
        job_reason(job(conditions=[cond("Progressing", "False", "SourceNotFound")]))
        == "SourceNotFound"
    )
    assert (
        job_reason(
            job(phase="Running", targets=[{"pod": "a", "phase": "Failed", "reason": "SourceStale"}])
        )
        == "Retrying:SourceStale"
    )
    assert (
        job_reason(job(phase="Succeeded", conditions=[cond("Progressing", "False", "Finished")]))
        == ""
    )


def running(t_bytes: dict[str, int], total: int = 300, **extra: Any) -> Any:
    return job(
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
    assert obj.status.targets
    obj.status.targets[0] = obj.status.targets[0].model_copy(
        update={"phase": "Done", "bytes": 90, "seconds": 3.0}
    )
    (t,) = job_view(obj, Rates(), 0.0, NOW).targets
    assert t.bytes == 100 and t.rate == pytest.approx(100 / 3) and t.eta is None


def test_outcome_from_conditions() -> None:
    assert outcome(job(conditions=[cond("Complete", "True", "AllTargetsDone")]))[0] == "Complete"
    assert outcome(
        job(phase="Failed", conditions=[cond("Failed", "True", "DeadlineExceeded", "late")])
    ) == ("Failed", "DeadlineExceeded", "late")
    assert outcome(job(phase="Running"))[0] is None


def test_final_lines() -> None:
    done = job(
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
    failed = job(
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


def test_objects_are_read_through_the_api_models() -> None:
    newer = rj(phase="Running", targetsSummary="0/1")
    newer["status"]["someFutureField"] = {"x": 1}  # a newer operator's field: ignored
    newer["status"]["conditions"] = [
        {**cond("Progressing", "True", "Transferring"), "severity": "x"}
    ]
    (row,) = [
        line
        for line in status_lines({"refitjobs": [newer]}, NOW, "ml")
        if line.startswith("refit ")
    ]
    assert row.split()[:5] == ["refit", "policy", "latest", "Running", "0/1"]
    bad = rj()
    bad["status"] = {"phase": "Exploded"}
    with pytest.raises(
        ObjectInvalid, match=r"refitjob 'refit': status\.phase: Input should be 'Pending'"
    ):
        status_lines({"refitjobs": [bad]}, NOW, "ml")
    # spec defaults come from the model, not from the plugin
    assert job().spec.strategy.max_fan_out == 4

"""A RefitJob over many target pods on kwok GPU nodes, reconciled by the real operator
(the measurement behind `ferry bench control-plane`), against the issue-8 budgets."""

from __future__ import annotations

import pytest

from ferry_bench.control_plane import Bench, run_one

# Budgets at 1,000 targets (issue 8): all assigned within 1 s of the job being
# stored, the job object under 300 kB, operator RSS under 300 MB. The time bounds
# here are looser: CI shares 2 cores with everything else. N=1,000 is not run here
# (~1 min of setup and teardown on the 2-core machine: `ferry bench control-plane`,
# docs/benchmarks.md).
ASSIGN_S = 3.0
ON_LEASES_S = 10.0  # every assignment on its agent's Lease
COMPLETE_S = 5.0  # the operator folds reports every second
# The goal is 300 bytes per target (300 kB / 1,000); measured ~240 at N=1,000
# (entry ~110, the operator's managedFields ~130).
JOB_BYTES_PER_TARGET = 300
RSS_MB = 300


@pytest.mark.parametrize("targets", [100])
def test_refit_over_kwok_targets(kwok_bench: Bench, targets: int) -> None:
    r = run_one(
        kwok_bench,
        targets,
        sources=8,
        strategy="chain",
        max_fan_out=4,
        lease_seconds=60,
        renew_seconds=20.0,
        timeout=240,
    )
    assert "error" not in r, r
    assert r["job_phase"] == "Succeeded"
    # Scheduled by GPU count: at most 8 per node (the scheduler spreads them out).
    assert -(-targets // 8) <= r["nodes"] <= targets
    assert r["assigned_s"] <= ASSIGN_S, r
    assert r["assigned_on_leases_s"] <= ON_LEASES_S, r
    assert r["complete_s"] <= COMPLETE_S, r
    # The job's status is the operator's alone: no managedFields entry for any agent.
    assert r["managed_fields_entries"]["final"] <= 3, r  # creator, kopf, operator
    assert r["job_bytes"]["final"] <= JOB_BYTES_PER_TARGET * targets + 8000, r["job_bytes"]
    assert r["operator"]["rss_peak_mb"] < RSS_MB, r["operator"]

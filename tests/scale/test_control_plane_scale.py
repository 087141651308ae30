"""A RefitJob over many target pods on kwok GPU nodes, reconciled by the real operator
(the measurement behind `ferry bench control-plane`), against the issue-8 budgets."""

from __future__ import annotations

import pytest

from ferry_operator.bench.control_plane import Bench, run_one

# Budgets at 1,000 targets (issue 8): all assigned within 1 s of the job being
# stored, the job object under 300 kB, operator RSS under 300 MB. The time bounds
# here are looser: CI shares 2 cores with everything else. N=1,000 is not run here:
# it takes minutes on the 2-core machine (`ferry bench control-plane`, docs/benchmarks.md).
ASSIGN_S = 3.0
COMPLETE_S = 20.0
# The goal is 300 bytes per target (300 kB / 1,000); measured ~400 (entry
# ~150, the operator's and the agents' managedFields ~250: docs/benchmarks.md).
# This bound catches growth (e.g. a managedFields entry per agent, ~650).
JOB_BYTES_PER_TARGET = 450
RSS_MB = 300


@pytest.mark.parametrize("targets", [100])
def test_refit_over_kwok_targets(kwok_bench: Bench, targets: int) -> None:
    r = run_one(kwok_bench, targets, sources=8, strategy="chain", max_fan_out=4,
                lease_seconds=60, renew_seconds=20.0, timeout=240)
    assert "error" not in r, r
    assert r["job_phase"] == "Succeeded"
    # Scheduled by GPU count: at most 8 per node (the scheduler spreads them out).
    assert -(-targets // 8) <= r["nodes"] <= targets
    assert r["assigned_s"] <= ASSIGN_S, r
    assert r["complete_s"] <= COMPLETE_S, r
    # No managedFields entry per agent: the operator's and the agents' shared one.
    assert r["managed_fields_entries"]["final"] <= 6, r  # creator, kopf, operator, agents
    assert r["job_bytes"]["final"] <= JOB_BYTES_PER_TARGET * targets + 8000, r["job_bytes"]
    assert r["operator"]["rss_peak_mb"] < RSS_MB, r["operator"]

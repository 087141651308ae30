"""The operator adopts finished targets' results so their agents can let go (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime

from ferry_api import ssa
from ferry_api.refitjob import RefitJobSpec
from ferry_operator.handlers.refitjob import World, compute_status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = RefitJobSpec.model_validate({"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}})
SOURCE = {"status": {"version": "5", "fingerprint": "fp", "bytes": 1000,
                     "conditions": [{"type": "Ready", "status": "True"}],
                     "members": [{"pod": "s0", "state": "Ready", "version": "5", "fingerprint": "fp",
                                  "endpoint": "s0:1"}]}}


def test_done_entries_are_adopted_in_flight_ones_are_not() -> None:
    status = {"phase": "Running", "version": "5", "startTime": "2026-01-01T00:00:00Z", "targets": [
        {"pod": "t0", "source": "s0", "attempts": 1, "observedAttempt": 1, "phase": "Done",
         "bytes": 1000, "endpoint": "t0:1", "seconds": 0.5},
        {"pod": "t1", "source": "s0", "attempts": 2, "observedAttempt": 2, "phase": "Pulling",
         "bytes": 10, "endpoint": "t1:1"},
        {"pod": "t2", "source": "s0", "attempts": 2, "observedAttempt": 1, "phase": "Done",
         "bytes": 1000, "endpoint": "t2:1"},  # an older attempt's result: not this one's
    ]}
    d = compute_status(SPEC, status, 1, World(SOURCE, {"t0": None, "t1": None, "t2": None},
                                              {"s0", "t0", "t1", "t2"}, T0))
    own = {e["pod"]: e for e in d.status["targets"]}
    assert own["t0"] == {"pod": "t0", "source": "s0", "attempts": 1, "observedAttempt": 1,
                         "phase": "Done", "bytes": 1000, "endpoint": "t0:1", "seconds": 0.5}
    assert own["t1"] == {"pod": "t1", "source": "s0", "attempts": 2}
    assert own["t2"] == {"pod": "t2", "source": "s0", "attempts": 2}


def test_owned_entry_fields_reads_managed_fields() -> None:
    job = {"metadata": {"managedFields": [
        {"manager": "ferry-operator", "operation": "Apply", "subresource": "status",
         "fieldsV1": {"f:status": {"f:targets": {
             'k:{"pod":"t0"}': {".": {}, "f:attempts": {}, "f:phase": {}, "f:pod": {}},
             'k:{"pod":"t1"}': {".": {}, "f:attempts": {}, "f:pod": {}}}}}},
        {"manager": "ferry-agent/t1", "operation": "Apply", "subresource": "status",
         "fieldsV1": {"f:status": {"f:targets": {'k:{"pod":"t1"}': {".": {}, "f:phase": {}}}}}},
        {"manager": "ferry-operator", "operation": "Update",
         "fieldsV1": {"f:metadata": {"f:annotations": {}}}},
    ]}}
    assert ssa.owned_entry_fields(job, ssa.OPERATOR_MANAGER, "targets", {"pod": "t0"}) == \
        {"attempts", "phase", "pod"}
    assert "phase" not in ssa.owned_entry_fields(job, ssa.OPERATOR_MANAGER, "targets", {"pod": "t1"})
    assert ssa.manages(job, "ferry-agent/t1") and not ssa.manages(job, "ferry-agent/t0")

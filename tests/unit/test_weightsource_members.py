"""The WeightSource status as its API model, and agents' entries read as ReplicaStatus:
an entry the operator cannot fully read (a newer agent's field or value) does not fail
the status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ferry_api.weightsource import ReplicaStatus, WeightSourceSpec, WeightSourceStatus
from ferry_operator.handlers import weightsource

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def spec(tp: int = 1, k: int = 1) -> WeightSourceSpec:
    return WeightSourceSpec.model_validate(
        {
            "model": {"name": "m"},
            "selector": {"matchLabels": {"a": "b"}},
            "layout": {"tensorParallelSize": tp, "ranksPerPod": k},
        }
    )


def member(pod: str, **kw: object) -> dict:
    return {"pod": pod, "state": "Ready", "fingerprint": "fp1", "version": "3", "bytes": 2048, **kw}


def cond(st: WeightSourceStatus, t: str) -> dict:
    return next(c for c in st.wire()["conditions"] if c["type"] == t)


def test_status_is_its_api_model_and_reads_back_unchanged() -> None:
    members = [member("p0", digest="d"), member("p1", fingerprint="odd")]
    first = weightsource.status_model(spec(), {"members": members}, 2, ["p0", "p1"], T0)
    assert isinstance(first, WeightSourceStatus) and first.version == "3" and first.digest == "d"
    assert first.members == [ReplicaStatus(pod="p1", state="Mismatched")]
    # the next reconcile reads what was applied (the agents' members under it) as the model
    again = weightsource.status_model(
        spec(),
        WeightSourceStatus.model_validate({**first.wire(), "members": members}),
        2,
        ["p0", "p1"],
        T0 + timedelta(minutes=1),
    )
    assert again.wire() == first.wire(), "nothing changed: the same status, transition times kept"
    assert weightsource.compute_status(spec(), {"members": members}, 2, ["p0", "p1"], T0) == (
        first.wire()
    )


def test_a_newer_agents_unknown_field_is_ignored() -> None:
    members = [
        member("p0", warmth="hot"),
        member("p1", state="Failed", reason="RankFailed", ranks=[{"localRank": 0, "new": 1}]),
    ]
    st = weightsource.status_model(spec(), {"members": members}, 1, ["p0", "p1"], T0)
    assert st.ready_replicas == 1 and cond(st, "Ready")["status"] == "True"
    assert (
        cond(st, "Degraded")["reason"] == "RankFailed"
        and "p1 local rank 0" in (cond(st, "Degraded")["message"])
    )


def test_an_entry_with_a_value_it_cannot_read_is_not_served_and_the_rest_is() -> None:
    members = [
        member("p0"),
        member("p1", localRanks=128),  # more than ReplicaStatus admits: not served
        member("p2", state="Draining"),  # a state a newer agent reports
        {"node": "n"},  # no pod: left out
        "garbage",
    ]
    st = weightsource.status_model(spec(), {"members": members}, 1, ["p0", "p1", "p2"], T0)
    assert st.ready_replicas == 1 and st.ready_summary == "1/3" and st.members is None
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["reason"] == "ReplicasNotReady"
    assert weightsource.read_member(member("p1", localRanks=128)) == ReplicaStatus(
        pod="p1", fingerprint="fp1", version="3", bytes=2048
    )


def test_an_unreadable_condition_of_its_own_is_replaced() -> None:
    bad = {
        "type": "Ready",
        "status": "Maybe",
        "reason": "X",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    st = weightsource.status_model(
        spec(), {"members": [member("p0")], "conditions": [bad]}, 1, ["p0"], T0
    )
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Ready")["lastTransitionTime"] == (
        "2026-01-01T00:00:00Z"
    )

"""Pure status logic: conditions and per-kind aggregation, no cluster needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ferry_api.artifactcache import ArtifactCacheSpec, ArtifactCacheStatus
from ferry_api.weightsource import WeightSourceSpec
from ferry_operator.conditions import Cond, human_bytes, set_conditions, transitions
from ferry_operator.handlers import artifactcache, weightsource

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WS = WeightSourceSpec.model_validate(
    {"model": {"name": "m"}, "selector": {"matchLabels": {"a": "b"}}}
)


def cond(status: Any, t: str) -> dict:
    wire = status.wire() if hasattr(status, "wire") else status
    return next(c for c in wire["conditions"] if c["type"] == t)


def test_transition_time_moves_only_when_status_flips() -> None:
    first = set_conditions(None, [Cond("Ready", False, "NoReplicas", "x")], 1, T0)
    same = set_conditions(
        first, [Cond("Ready", False, "NoReadyReplicas", "y")], 2, T0 + timedelta(minutes=1)
    )
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["observedGeneration"] == 2 and same[0]["reason"] == "NoReadyReplicas"
    flipped = set_conditions(
        same, [Cond("Ready", True, "ReplicasReady")], 2, T0 + timedelta(minutes=2)
    )
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:02:00Z"
    assert [c["type"] for c in transitions(same, flipped)] == ["Ready"]
    assert transitions(flipped, flipped) == []


def test_conditions_of_other_writers_are_kept() -> None:
    other = [
        {
            "type": "Custom",
            "status": "True",
            "reason": "X",
            "message": "",
            "lastTransitionTime": "t",
        }
    ]
    out = set_conditions(other, [Cond("Ready", None, "Unknown")], 1, T0)
    assert [c["type"] for c in out] == ["Ready", "Custom"] and out[0]["status"] == "Unknown"


def member(pod: str, state: str = "Ready", fp: str = "fp1", version: str = "3") -> dict:
    return {
        "pod": pod,
        "state": state,
        "fingerprint": fp,
        "version": version,
        "bytes": 2048,
        "tensors": 2,
    }


def test_weightsource_no_pods() -> None:
    st = weightsource.compute_status(WS, {}, 1, [], T0)
    assert cond(st, "Ready")["reason"] == "NoReplicas" and "a=b" in cond(st, "Ready")["message"]
    assert st["readySummary"] == "0/0" and cond(st, "Degraded")["status"] == "False"


def test_weightsource_ready_majority_and_mismatch_flagged() -> None:
    status = {"members": [member("p0"), member("p1"), member("p2", fp="other"), member("gone")]}
    st = weightsource.compute_status(WS, status, 4, ["p0", "p1", "p2"], T0)
    assert st["readyReplicas"] == 2 and st["replicas"] == 3 and st["readySummary"] == "2/3"
    assert st["fingerprint"] == "fp1" and st["version"] == "3" and st["size"] == "2.0KiB"
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "FingerprintMismatch"
    assert "p2" in degraded["message"]


def test_weightsource_stale_replica_degrades() -> None:
    status = {"members": [member("p0"), member("p1", state="Stale")]}
    st = weightsource.compute_status(WS, status, 1, ["p0", "p1"], T0)
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["reason"] == "ReplicasStale"


def test_artifactcache_trust_modes() -> None:
    base = {
        "kinds": ["triton"],
        "identity": {"triton": "3.7", "cuda": "13.0", "gpuArch": "sm_90"},
        "sources": {"matchLabels": {"a": "b"}},
        "targets": {"matchLabels": {"c": "d"}},
    }
    st = artifactcache.compute_status(ArtifactCacheSpec.model_validate(base), {}, 1, [], [], T0)
    assert st.trust == "Refused" and cond(st, "Trusted")["reason"] == "UnsignedRefused"
    assert "spec.trust.allowUnsigned" in cond(st, "Trusted")["message"]
    assert cond(st, "Ready")["reason"] == "NoSource"
    unsigned = ArtifactCacheSpec.model_validate({**base, "trust": {"allowUnsigned": True}})
    st = artifactcache.compute_status(unsigned, {}, 1, [], [], T0)
    assert st.trust == "Unverified" and cond(st, "Trusted")["status"] == "False"
    assert cond(st, "Trusted")["reason"] == "UnsignedAllowed"
    with pytest.raises(ValueError, match="allowUnsigned"):
        ArtifactCacheSpec.model_validate({**base, "trust": {"key": "k.pub"}})  # neither
    signed = ArtifactCacheSpec.model_validate({**base, "trust": {"secretRef": "k"}})
    st = artifactcache.compute_status(signed, {}, 1, ["s"], ["t"], T0)
    assert st.trust == "Signed" and cond(st, "Ready")["reason"] == "NoMatchingCache"


def _cache(kind: str, mid: str) -> dict:
    return {"kind": kind, "identity": "i" * 64, "manifestId": mid, "bytes": 100, "files": 3}


def test_artifactcache_picks_a_covering_source_and_counts_installs() -> None:
    spec = ArtifactCacheSpec.model_validate(
        {
            "kinds": ["triton", "deepgemm"],
            "identity": {"triton": "3.7", "cuda": "13.0", "gpuArch": "sm_90"},
            "sources": {"matchLabels": {"a": "b"}},
            "targets": {"matchLabels": {"c": "d"}},
        }
    )
    caches = [_cache("triton", "1" * 64), _cache("deepgemm", "2" * 64)]
    members = [
        {"pod": "s0", "role": "source", "state": "Packed", "caches": caches[:1]},  # lacks deepgemm
        {"pod": "s1", "role": "source", "state": "Packed", "caches": caches},
        {"pod": "t0", "role": "target", "state": "Installed", "caches": caches},
        {
            "pod": "t1",
            "role": "target",
            "state": "Failed",
            "reason": "SignatureInvalid",
            "message": "bad",
        },
        {"pod": "t2", "role": "target", "state": "Installing"},
    ]
    st = artifactcache.compute_status(
        spec, {"members": members}, 1, ["s0", "s1"], ["t0", "t1", "t2"], T0, live={"s0", "s1"}
    )
    assert st.source == "s1" and st.bytes == 200 and st.files == 6
    assert st.manifest_id.startswith("sha256:") and st.installed == 1
    assert st.wire()["failures"] == [{"pod": "t1", "reason": "SignatureInvalid", "message": "bad"}]
    assert (
        cond(st, "Ready")["status"] == "True"
        and cond(st, "Degraded")["reason"] == "InstallFailures"
    )
    # a source whose agent died is not chosen
    st = artifactcache.compute_status(
        spec, {"members": members}, 1, ["s0", "s1"], ["t0"], T0, live={"s0"}
    )
    assert "source" not in st.wire() and cond(st, "Ready")["reason"] == "NoMatchingCache"


def test_artifactcache_status_is_its_api_model_without_the_agents_members() -> None:
    spec = ArtifactCacheSpec.model_validate(
        {
            "kinds": ["triton"],
            "identity": {"triton": "3.7", "cuda": "13.0", "gpuArch": "sm_90"},
            "sources": {"matchLabels": {"a": "b"}},
            "targets": {"matchLabels": {"c": "d"}},
        }
    )
    members = [
        {"pod": "s0", "role": "source", "state": "Packed", "caches": [_cache("triton", "1" * 64)]},
        {
            "pod": "t0",
            "role": "target",
            "state": "Failed",
            "reason": "Timeout",
            "message": "m" * 500,
        },
    ]
    first = artifactcache.compute_status(spec, {"members": members}, 2, ["s0"], ["t0"], T0)
    assert isinstance(first, ArtifactCacheStatus) and first.members is None
    assert (
        first.manifest_id == "1" * 64
        and first.failures
        and len(first.failures[0].message or "") == 200
    )
    # the next reconcile reads what was applied (plus the agents' members) as the model
    again = artifactcache.compute_status(
        spec,
        ArtifactCacheStatus.model_validate({**first.wire(), "members": members}),
        2,
        ["s0"],
        ["t0"],
        T0 + timedelta(minutes=1),
    )
    assert again.wire() == first.wire(), "nothing changed: the same status, transition times kept"


def test_human_bytes() -> None:
    assert (
        human_bytes(512) == "512B"
        and human_bytes(3 << 30) == "3.0GiB"
        and human_bytes(None) is None
    )


def test_selector_rendering() -> None:
    spec = WeightSourceSpec.model_validate(
        {
            "model": {"name": "m"},
            "selector": {
                "matchLabels": {"b": "2", "a": "1"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["x", "y"]},
                    {"key": "gone", "operator": "DoesNotExist"},
                ],
            },
        }
    )
    assert spec.selector.to_label_selector() == "a=1,b=2,tier in (x,y),!gone"


def test_expired_lease_marks_stale_and_overrides_only_state() -> None:
    status = {"members": [member("p0"), member("p1")]}
    st = weightsource.compute_status(WS, status, 1, ["p0", "p1"], T0, live={"p0"})
    assert st["readyReplicas"] == 1
    assert st["members"] == [{"pod": "p1", "state": "Stale"}]
    assert cond(st, "Degraded")["reason"] == "ReplicasStale"
    # fresh again: no override, the agent's own Ready stands
    st = weightsource.compute_status(WS, status, 1, ["p0", "p1"], T0, live={"p0", "p1"})
    assert "members" not in st and st["readyReplicas"] == 2


def test_mismatched_replica_is_flagged_on_its_entry() -> None:
    status = {"members": [member("p0"), member("p1"), member("p2", fp="odd")]}
    st = weightsource.compute_status(WS, status, 1, ["p0", "p1", "p2"], T0, live={"p0", "p1", "p2"})
    assert st["members"] == [{"pod": "p2", "state": "Mismatched"}]


def test_standby_peer_is_live_and_outranking_detection() -> None:
    from ferry_operator.health import WatchHealth, outranked

    h = WatchHealth(interval=1, grace=0, started=0.0)
    assert h.problems([], now=100.0), "no watchers and no canary: not live"
    h.standby = True
    assert h.problems([], now=100.0) == []
    fresh = T0.isoformat()
    peers = {
        "a": {"priority": 5, "lifetime": 60, "lastseen": fresh},
        "b": {"priority": 1, "lifetime": 60, "lastseen": fresh},
    }
    assert outranked(peers, 1, T0 + timedelta(seconds=10))
    assert not outranked(peers, 5, T0 + timedelta(seconds=10))
    assert not outranked(peers, 1, T0 + timedelta(seconds=61)), "a dead peer outranks nobody"


def test_selector_matching() -> None:
    from ferry_api.meta import selector_matches

    sel = {
        "matchLabels": {"app": "x"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "gone", "operator": "DoesNotExist"},
        ],
    }
    assert selector_matches(sel, {"app": "x", "tier": "a"})
    assert not selector_matches(sel, {"app": "x", "tier": "c"})
    assert not selector_matches(sel, {"app": "x", "tier": "a", "gone": "1"})
    assert not selector_matches({}, {"app": "x"}), "an empty selector selects nothing here"


def test_artifactcache_status_survives_an_entry_it_cannot_read() -> None:
    """A newer agent's unknown field is ignored; an entry with a bad value loses that value
    (its state: not counted as installed), the other entries still count."""
    spec = ArtifactCacheSpec.model_validate(
        {
            "kinds": ["triton"],
            "identity": {"triton": "3.7", "cuda": "13.0", "gpuArch": "sm_90"},
            "sources": {"matchLabels": {"a": "b"}},
            "targets": {"matchLabels": {"c": "d"}},
            "trust": {"allowUnsigned": True},
        }
    )
    caches = [_cache("triton", "1" * 64)]
    members = [
        {"pod": "s0", "role": "source", "state": "Packed", "caches": caches, "newField": 1},
        {"pod": "t0", "role": "target", "state": "Installed", "caches": caches},
        {"pod": "t1", "role": "target", "state": "Exploded", "caches": caches},
    ]
    st = artifactcache.compute_status(spec, {"members": members}, 1, ["s0"], ["t0", "t1"], T0)
    assert st.source == "s0"
    assert st.installed == 1

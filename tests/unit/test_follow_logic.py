"""RefitJob version: follow — the operator's pure decisions (handlers/follow.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from ferry_api.refitjob import RefitJobSpec
from ferry_operator.handlers import follow

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def spec(**kw):  # type: ignore[no-untyped-def]
    return RefitJobSpec.model_validate(
        {
            "sourceRef": {"name": "ws"},
            "version": "follow",
            "targets": {"matchLabels": {"app": "inf"}},
            **kw,
        }
    )


def source(version="v3", pods=("src-0",)):  # type: ignore[no-untyped-def]
    return {
        "status": {
            "version": version,
            "fingerprint": "fp",
            "members": [
                {
                    "pod": p,
                    "endpoint": f"10.0.0.{i}:7470",
                    "state": "Ready",
                    "version": version,
                    "fingerprint": "fp",
                }
                for i, p in enumerate(pods)
            ],
        }
    }


def world(targets, reports=None, src=None, live=None):  # type: ignore[no-untyped-def]
    src = src or source()
    pods = {m["pod"] for m in src["status"].get("members", [])}
    return follow.World(
        src,
        {t: None for t in targets},
        set(live if live is not None else [*targets, *pods]),
        NOW,
        reports or {},
    )


def test_direct_round_robins_source_replicas_and_writes_endpoints():
    d = follow.compute("j", spec(), {}, 1, world(["a", "b", "c"], src=source(pods=("s0", "s1"))))
    assert {p: a.source for p, a in d.assignments.items()} == {"a": "s0", "b": "s1", "c": "s0"}
    assert d.assignments["b"].source_endpoint == "10.0.0.1:7470"
    assert all(a.upstream is None for a in d.assignments.values())
    assert d.status["phase"] == "Following"


def test_chain_and_tree_topologies():
    links = follow.topology("chain", 4, ["a", "b", "c"], ["s"])
    assert [(link.pod, link.upstream) for link in links] == [("a", None), ("b", "a"), ("c", "b")]
    links = follow.topology("tree", 2, ["a", "b", "c", "d", "e", "f"], ["s"])
    assert [link.upstream for link in links] == [None, None, "a", "a", "b", "b"]


def test_upstream_without_a_known_endpoint_pulls_from_the_source():
    s = spec(strategy={"type": "chain"})
    d = follow.compute("j", s, {}, 1, world(["a", "b"]))
    assert d.assignments["b"].upstream is None  # a has not reported its endpoint yet
    d = follow.compute(
        "j", s, {}, 1, world(["a", "b"], {"a": {"endpoint": "10.1.0.1:7470", "version": "v3"}})
    )
    assert (
        d.assignments["b"].upstream == "a"
        and d.assignments["b"].upstream_endpoint == "10.1.0.1:7470"
    )


def test_synced_when_every_target_reports_the_latest_version():
    reports = {
        "a": {"version": "v3", "ok": True, "lastRefitTime": "2026-12-02T12:00:00Z", "bytes": 10},
        "b": {"version": "v2", "ok": True},
    }
    d = follow.compute("j", spec(), {}, 1, world(["a", "b"], reports))
    synced = next(c for c in d.status["conditions"] if c["type"] == "Synced")
    assert synced["status"] == "False" and "b" in synced["message"]
    assert d.status["targetsSummary"] == "1/2"
    a = next(e for e in d.status["targets"] if e["pod"] == "a")
    assert a["version"] == "v3" and a["phase"] == "Done" and a["lastRefitTime"].startswith("2026")
    reports["b"]["version"] = "v3"
    d = follow.compute("j", spec(), d.status, 1, world(["a", "b"], reports))
    synced = next(c for c in d.status["conditions"] if c["type"] == "Synced")
    assert synced["status"] == "True" and synced["reason"] == "AllTargetsSynced"


def test_membership_keeps_order_drops_agentless_and_source_pods():
    d = follow.compute("j", spec(strategy={"type": "chain"}), {}, 1, world(["b", "a"]))
    st = d.status
    d = follow.compute(
        "j",
        spec(strategy={"type": "chain"}),
        st,
        1,
        world(["a", "b", "0new", "src-0"], live=["b", "0new", "src-0"]),
    )
    assert [e["pod"] for e in d.status["targets"]] == ["b", "0new"]  # a has no agent; new appended
    assert set(d.assignments) == {"b", "0new"}


def test_an_expired_lease_keeps_its_place_and_shows_agent_unavailable():
    w = world(["a", "b"], live=["a", "src-0"])
    w = follow.World(w.source, w.targets, w.live, w.now, {}, expired={"b"})
    d = follow.compute("j", spec(strategy={"type": "chain"}), {}, 1, w)
    assert set(d.assignments) == {"a", "b"}
    b = next(e for e in d.status["targets"] if e["pod"] == "b")
    assert b["phase"] == "Failed" and b["reason"] == "AgentUnavailable"


def test_failed_report_is_shown_with_reason():
    d = follow.compute(
        "j",
        spec(),
        {},
        1,
        world(
            ["a"], {"a": {"version": "v2", "ok": False, "reason": "LayoutMismatch", "message": "x"}}
        ),
    )
    (e,) = d.status["targets"]
    assert e["phase"] == "Failed" and e["reason"] == "LayoutMismatch" and e["version"] == "v2"


def test_no_ready_source_assigns_nothing():
    d = follow.compute("j", spec(), {}, 1, world(["a"], src={"status": {}}))
    assert d.assignments == {}
    synced = next(c for c in d.status["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "SourceNotReady"


def test_follow_with_reshard_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="transform.type"):
        spec(transform={"type": "reshard"})


def test_a_source_writing_its_next_version_keeps_its_followers():
    src = source()
    src["status"]["members"][0]["state"] = "Loading"  # between begin_write and publish
    d = follow.compute("j", spec(), {}, 1, world(["a"], src=src))
    assert set(d.assignments) == {"a"}
    src["status"]["members"][0]["state"] = "Stale"
    assert follow.compute("j", spec(), {}, 1, world(["a"], src=src)).assignments == {}


def test_a_bad_follow_report_loses_its_bad_values_not_the_reconcile():
    """A follow report is an annotation its pod can fill with anything: a time that is
    not one, a duration that is not finite, bytes beyond int64 are left out of the entry
    (the status is validated with its model, and the apiserver would refuse them)."""
    bad = {
        "a": {
            "version": "v3",
            "lastRefitTime": "yesterday",
            "seconds": float("inf"),
            "bytes": 2**70,
        }
    }
    d = follow.compute("j", spec(), {}, 1, world(["a"], bad))
    (e,) = d.status["targets"]
    assert e == {"pod": "a", "source": "src-0", "version": "v3", "phase": "Done"}
    good = {
        "a": {"version": "v3", "lastRefitTime": "2026-12-02T11:59:00Z", "seconds": 0.5, "bytes": 10}
    }
    (e,) = follow.compute("j", spec(), {}, 1, world(["a"], good)).status["targets"]
    assert (e["lastRefitTime"], e["seconds"], e["bytes"]) == ("2026-12-02T11:59:00Z", 0.5, 10)

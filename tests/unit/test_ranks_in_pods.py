"""Ranks inside pods, pure: the API's rule, the global rank mapping in the planner and
RefitJob assignments (same-rank and reshard, 2-rank pods to 1-rank pods and back), and
the WeightSource status of pods holding several ranks (compact, a failed rank named)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from ferry_api import leases, ranks
from ferry_api.refitjob import RefitJobSpec
from ferry_api.weightsource import Layout, WeightSourceSpec
from ferry_operator.handlers import weightsource
from ferry_operator.handlers.refitjob import World, assignments, compute_status
from ferry_operator.planner import Peer, TargetState, plan_ranks

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LABEL = "ferry.dev/tp-rank"


def test_ranks_per_pod_must_divide_tp_and_the_message_names_the_field() -> None:
    assert Layout(tensor_parallel_size=4, ranks_per_pod=2).ranks_per_pod == 2
    with pytest.raises(
        ValidationError, match="layout.ranksPerPod must divide layout.tensorParallelSize"
    ):
        Layout(tensor_parallel_size=2, ranks_per_pod=4)
    with pytest.raises(ValidationError, match="spec.targetRanksPerPod must divide"):
        rj(transform={"type": "reshard", "targetTensorParallelSize": 2}, targetRanksPerPod=4)


def test_rank_addresses_round_trip() -> None:
    assert ranks.address("p", 1, 2) == "p/1" and ranks.address("p", 0, 1) == "p"
    src = ranks.join_groups([("a/0", "b/0"), ("a/1",)])
    assert src == "a/0,b/0|a/1" and ranks.split_groups(src) == [("a/0", "b/0"), ("a/1",)]
    assert ranks.pods_of(src) == ("a", "b") and ranks.per_rank(src) and not ranks.per_rank("a,b")
    assert ranks.RankAddress.parse("a/3") == ("a", 3) and ranks.RankAddress.parse("a") == ("a", 0)


# -- planner ---------------------------------------------------------------------------


def test_plan_ranks_same_rank_from_a_two_rank_pod_to_one_rank_pods_and_back() -> None:
    two = {0: [Peer("src/0")], 1: [Peer("src/1")]}
    p = plan_ranks("direct", two, [TargetState("t0"), TargetState("t1")], {"t0": (0,), "t1": (1,)})
    assert p.groups == {"t0": (("src/0",),), "t1": (("src/1",),)}
    # the reverse: one-rank source pods feed one two-rank target pod, rank by rank
    ones = {0: [Peer("s0")], 1: [Peer("s1")]}
    p = plan_ranks("direct", ones, [TargetState("t")], {"t": (0, 1)})
    assert p.groups == {"t": (("s0",), ("s1",))} and p.assign == {"t": ("s0", "s1")}


def test_plan_ranks_global_rank_is_pod_rank_times_ranks_per_pod_plus_local() -> None:
    # TP 4 in 2-rank pods: pod rank 1 holds global ranks 2 and 3
    src = {g: [Peer(f"s{g // 2}/{g % 2}")] for g in range(4)}
    p = plan_ranks("direct", src, [TargetState("t1")], {"t1": (2, 3)})
    assert p.groups == {"t1": (("s1/0",), ("s1/1",))}


def test_plan_ranks_reshard_gives_every_target_rank_every_source_rank() -> None:
    src = {0: [Peer("src/0")], 1: [Peer("src/1")]}
    p = plan_ranks(
        "direct", src, [TargetState("t0"), TargetState("t1")], {"t0": (0,), "t1": (0,)}, reshard=2
    )
    assert p.groups == {"t0": (("src/0", "src/1"),), "t1": (("src/0", "src/1"),)}


def test_plan_ranks_assigns_a_pod_only_when_every_local_rank_has_a_source() -> None:
    p = plan_ranks("direct", {0: [Peer("s0")], 1: []}, [TargetState("t")], {"t": (0, 1)})
    assert not p.assign and p.exhausted == ("t",)
    busy = TargetState(
        "x", phase="Pulling", sources=("s1",), groups=(("s1",),)
    )  # its rank 1 pulls s1
    p = plan_ranks(
        "direct",
        {0: [Peer("s0")], 1: [Peer("s1")]},
        [TargetState("t"), busy],
        {"t": (0, 1), "x": (1,)},
        max_fan_out=1,
    )
    assert not p.assign and p.waiting == ("t",)


def test_plan_ranks_fan_out_is_per_rank_and_a_retry_avoids_the_failed_ranks() -> None:
    src = {0: [Peer("a/0"), Peer("b/0")], 1: [Peer("a/1"), Peer("b/1")]}
    retry = TargetState(
        "t",
        failed_sources=frozenset({"a/0", "a/1"}),
        sources=("a/0", "a/1"),
        groups=(("a/0",), ("a/1",)),
    )
    p = plan_ranks("direct", src, [retry], {"t": (0, 1)})
    assert p.groups == {"t": (("b/0",), ("b/1",))}


# -- RefitJob ----------------------------------------------------------------------------


def rj(**kw: object) -> RefitJobSpec:
    return RefitJobSpec.model_validate(
        {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}, **kw}
    )


def member(
    pod: str,
    fp: str,
    rank: int | None = None,
    local_ranks: int | None = None,
    state: str = "Ready",
    version: str = "5",
    **extra: object,
) -> dict:
    m = {
        "pod": pod,
        "state": state,
        "fingerprint": fp,
        "version": version,
        "bytes": 1000,
        "tensors": 4,
        "endpoint": f"{pod}:1",
        **extra,
    }
    if rank is not None:
        m["rank"] = rank
    if local_ranks is not None:
        m["localRanks"] = local_ranks
    return m


def ws_spec(tp: int, k: int) -> WeightSourceSpec:
    return WeightSourceSpec.model_validate(
        {
            "model": {"name": "m"},
            "selector": {"matchLabels": {"a": "b"}},
            "layout": {"tensorParallelSize": tp, "ranksPerPod": k},
        }
    )


def ws_status(tp: int, k: int, members: list[dict]) -> dict:
    return weightsource.compute_status(
        ws_spec(tp, k), {"members": members}, 1, [m["pod"] for m in members], T0
    )


def source(tp: int, k: int, members: list[dict]) -> dict:
    return {
        "metadata": {"name": "src"},
        "spec": {"layout": {"tensorParallelSize": tp, "ranksPerPod": k}},
        "status": {**ws_status(tp, k, members), "members": members},
    }


def world(src: dict, targets: dict[str, str | None]) -> World:
    live = {m["pod"] for m in src["status"]["members"]} | set(targets)
    labels = {t: ({} if r is None else {LABEL: r}) for t, r in targets.items()}
    return World(src, {t: None for t in targets}, live, T0, labels=labels)


def entries(d) -> dict:
    return {e["pod"]: e["source"] for e in d.status.get("targets") or []}


def test_two_rank_pod_to_two_rank_pod_same_rank_and_the_lease_assignment_per_rank() -> None:
    src = source(2, 2, [member("trainer-0", "tp2:x", local_ranks=2)])
    d = compute_status(rj(), {}, 1, world(src, {"infer-0": None}))
    assert entries(d) == {"infer-0": "trainer-0/0|trainer-0/1"}
    assert d.status["bytesTotal"] == 1000, "a 2-rank target of a TP 2 source holds a full copy"
    (a,) = assignments("j", rj(), {**d.status, "phase": "Running"}).values()
    assert a.upstream == ("trainer-0",)
    assert [(r.local_rank, r.sources) for r in a.ranks or []] == [
        (0, ["trainer-0/0"]),
        (1, ["trainer-0/1"]),
    ]


def test_two_rank_pod_to_two_one_rank_pods_and_the_reverse() -> None:
    src = source(2, 2, [member("trainer-0", "tp2:x", local_ranks=2)])
    d = compute_status(rj(targetRanksPerPod=1), {}, 1, world(src, {"shard-0": "0", "shard-1": "1"}))
    assert entries(d) == {"shard-0": "trainer-0/0", "shard-1": "trainer-0/1"}
    assert d.status["bytesTotal"] == 1000
    src = source(2, 1, [member("s0", "f0", rank=0), member("s1", "f1", rank=1)])
    d = compute_status(rj(targetRanksPerPod=2), {}, 1, world(src, {"infer-0": None}))
    assert entries(d) == {"infer-0": "s0|s1"}
    (a,) = assignments("j", rj(targetRanksPerPod=2), {**d.status, "phase": "Running"}).values()
    assert [r.sources for r in a.ranks or []] == [["s0"], ["s1"]]


def test_reshard_from_a_tp2_pod_to_tp1_pods() -> None:
    src = source(2, 2, [member("trainer-0", "tp2:x", local_ranks=2)])
    spec = rj(transform={"type": "reshard", "targetTensorParallelSize": 1})
    d = compute_status(spec, {}, 1, world(src, {"a": None, "b": None}))
    assert entries(d) == {"a": "trainer-0/0,trainer-0/1", "b": "trainer-0/0,trainer-0/1"}
    (a, _) = assignments("j", spec, {**d.status, "phase": "Running"}).values()
    assert [r.sources for r in a.ranks or []] == [["trainer-0/0", "trainer-0/1"]]


def test_single_rank_pods_keep_the_plain_assignment() -> None:
    src = source(2, 1, [member("s0", "f0", rank=0), member("s1", "f1", rank=1)])
    d = compute_status(rj(), {}, 1, world(src, {"t0": "0", "t1": "1"}))
    assert entries(d) == {"t0": "s0", "t1": "s1"}
    assert all(
        a.ranks is None for a in assignments("j", rj(), {**d.status, "phase": "Running"}).values()
    )
    wire = leases.Assignment(job="j", attempt=1, source="s0", spec=rj()).wire()
    assert "ranks" not in wire


def test_target_ranks_per_pod_that_does_not_divide_the_source_tp_is_refused_by_name() -> None:
    src = source(2, 1, [member("s0", "f0", rank=0), member("s1", "f1", rank=1)])
    d = compute_status(rj(targetRanksPerPod=4), {}, 1, world(src, {"t": None}))
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert d.status["phase"] == "Failed" and failed["reason"] == "TargetRanksPerPodInvalid"
    assert "spec.targetRanksPerPod" in failed["message"]


# -- WeightSource ------------------------------------------------------------------------


def cond(status: dict, t: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == t)


def test_a_two_rank_pod_is_one_ready_replica_with_its_combined_fingerprint() -> None:
    fp = ranks.combined({0: "f0", 1: "f1"})
    st = ws_status(2, 2, [member("p", fp, local_ranks=2, digest="d")])
    assert cond(st, "Ready")["status"] == "True" and st["readySummary"] == "1/1"
    assert st["fingerprint"] == fp == weightsource.tp_fingerprint({0: "f0", 1: "f1"}), (
        "a pod holding every rank reports what two one-rank pods add up to"
    )
    assert st["bytes"] == 1000 and st["digest"] == "d"


def test_pods_of_two_ranks_in_tp4_need_both_pod_ranks() -> None:
    st = ws_status(4, 2, [member("p0", "a", rank=0, local_ranks=2)])
    assert (
        cond(st, "Ready")["reason"] == "RanksIncomplete"
        and "pod ranks 1" in cond(st, "Ready")["message"]
    )
    st = ws_status(
        4, 2, [member("p0", "a", rank=0, local_ranks=2), member("p1", "b", rank=1, local_ranks=2)]
    )
    assert cond(st, "Ready")["status"] == "True" and st["bytes"] == 2000


def test_a_failed_local_rank_is_named_on_its_pods_entry_and_the_pod_is_not_ready() -> None:
    bad = member(
        "p",
        "f",
        local_ranks=2,
        state="Failed",
        reason="LayoutTooLarge",
        ranks=[
            {
                "localRank": 1,
                "rank": 1,
                "state": "Failed",
                "reason": "LayoutTooLarge",
                "message": "needs 512 MiB",
            }
        ],
    )
    st = ws_status(2, 2, [member("q", "tp2:x", local_ranks=2), bad])
    assert st["readySummary"] == "1/2"
    deg = cond(st, "Degraded")
    assert (
        deg["reason"] == "RankFailed"
        and "p local rank 1 (rank 1): LayoutTooLarge: needs 512 MiB" in deg["message"]
    )


def test_a_pod_with_another_number_of_local_ranks_is_not_served() -> None:
    st = ws_status(2, 2, [member("p", "tp2:x", local_ranks=2), member("q", "tp2:x")])
    assert st["readySummary"] == "1/2" and {"pod": "q", "state": "Mismatched"} in st["members"]
    deg = cond(st, "Degraded")
    assert deg["reason"] == "RanksPerPodMismatch" and "spec.layout.ranksPerPod=2" in deg["message"]

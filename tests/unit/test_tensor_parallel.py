"""Tensor-parallel sources and RefitJob transforms, pure: per-rank WeightSource status,
per-rank and reshard assignments, target ranks from labels, and refusals."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from ferry_api.refitjob import RefitJobSpec
from ferry_api.weightsource import WeightSourceSpec
from ferry_operator.handlers import weightsource
from ferry_operator.handlers.refitjob import World, compute_status
from ferry_operator.planner import Peer, TargetState, plan_per_rank, plan_reshard

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LABEL = "ferry.dev/tp-rank"


def ws_spec(tp: int, **layout: object) -> WeightSourceSpec:
    return WeightSourceSpec.model_validate(
        {
            "model": {"name": "m"},
            "selector": {"matchLabels": {"a": "b"}},
            "layout": {"tensorParallelSize": tp, **layout},
        }
    )


def member(pod: str, rank: int | None, fp: str, version: str = "3", state: str = "Ready") -> dict:
    m = {
        "pod": pod,
        "state": state,
        "fingerprint": fp,
        "version": version,
        "bytes": 1000,
        "tensors": 4,
        "endpoint": f"{pod}:1",
    }
    if rank is not None:
        m["rank"] = rank
    return m


def cond(status: dict, t: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == t)


def ws_status(tp: int, members: list[dict]) -> dict:
    return weightsource.compute_status(
        ws_spec(tp), {"members": members}, 1, [m["pod"] for m in members], T0
    )


# -- WeightSource ---------------------------------------------------------------------


def test_tp2_ranks_with_their_own_fingerprints_are_ready_and_not_mismatched() -> None:
    st = ws_status(
        2,
        [
            member("a0", 0, "fpA"),
            member("b0", 0, "fpA"),
            member("a1", 1, "fpB"),
            member("b1", 1, "fpB"),
        ],
    )
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Degraded")["status"] == "False"
    assert st["readyReplicas"] == 4 and "members" not in st and st["version"] == "3"
    digest = hashlib.sha256(b"0=fpA\n1=fpB").hexdigest()
    assert st["fingerprint"] == f"tp2:{digest}"
    assert st["bytes"] == 2000, "one full copy: one replica of each rank"


def test_tp2_fingerprint_is_stable_and_tracks_each_rank() -> None:
    one = ws_status(2, [member("a0", 0, "fpA"), member("a1", 1, "fpB")])["fingerprint"]
    again = ws_status(2, [member("x1", 1, "fpB"), member("x0", 0, "fpA"), member("y0", 0, "fpA")])[
        "fingerprint"
    ]
    other = ws_status(2, [member("a0", 0, "fpA"), member("a1", 1, "fpC")])["fingerprint"]
    assert one == again and one != other


def test_majority_is_per_rank() -> None:
    st = ws_status(
        2,
        [
            member("a0", 0, "fpA"),
            member("b0", 0, "fpA"),
            member("c0", 0, "odd"),
            member("a1", 1, "fpB"),
        ],
    )
    assert st["members"] == [{"pod": "c0", "state": "Mismatched"}]
    assert (
        cond(st, "Degraded")["reason"] == "FingerprintMismatch"
        and "c0" in cond(st, "Degraded")["message"]
    )
    assert cond(st, "Ready")["status"] == "True" and st["readyReplicas"] == 3


def test_not_ready_until_every_rank_serves_one_version() -> None:
    st = ws_status(2, [member("a0", 0, "fpA"), member("b0", 0, "fpA")])
    assert (
        cond(st, "Ready")["status"] == "False" and cond(st, "Ready")["reason"] == "RanksIncomplete"
    )
    assert "ranks 1" in cond(st, "Ready")["message"] and "version" not in st
    mixed = ws_status(2, [member("a0", 0, "fpA", "4"), member("a1", 1, "fpB", "3")])
    assert cond(mixed, "Ready")["reason"] == "RanksIncomplete" and "version" not in mixed
    rolling = ws_status(
        2, [member("a0", 0, "fpA", "4"), member("a1", 1, "fpB", "3"), member("b0", 0, "fpA", "3")]
    )
    assert cond(rolling, "Ready")["status"] == "True" and rolling["version"] == "3"


def test_replica_without_rank_or_out_of_range_is_flagged_with_the_label() -> None:
    st = ws_status(
        2,
        [
            member("a0", 0, "fpA"),
            member("a1", 1, "fpB"),
            member("none", None, "fpA"),
            member("big", 2, "fpA"),
        ],
    )
    assert sorted(st["members"], key=lambda m: m["pod"]) == [
        {"pod": "big", "state": "Mismatched"},
        {"pod": "none", "state": "Mismatched"},
    ]
    d = cond(st, "Degraded")
    assert d["reason"] == "RankInvalid" and LABEL in d["message"] and "big" in d["message"]
    assert cond(st, "Ready")["status"] == "True" and st["readyReplicas"] == 2


def test_tp1_ignores_ranks() -> None:
    st = ws_status(1, [member("a", None, "fp"), member("b", 3, "fp")])
    assert st["fingerprint"] == "fp" and st["readyReplicas"] == 2 and "members" not in st


# -- planner ---------------------------------------------------------------------------


def test_per_rank_plan_serves_each_target_from_its_own_rank() -> None:
    sources = {0: [Peer("s0")], 1: [Peer("s1"), Peer("s1b")]}
    ts = [TargetState("t0"), TargetState("t1"), TargetState("t2")]
    p = plan_per_rank("direct", sources, ts, {"t0": 0, "t1": 1, "t2": 1})
    assert p.assign["t0"] == ("s0",) and {p.assign["t1"], p.assign["t2"]} == {("s1",), ("s1b",)}
    chain = plan_per_rank(
        "chain", sources, [TargetState("t0"), TargetState("u0")], {"t0": 0, "u0": 0}
    )
    assert chain.assign == {"t0": ("s0",), "u0": ("t0",)}, "a chain relays within its rank"


def test_reshard_plan_gives_one_replica_per_source_rank_in_rank_order() -> None:
    sources = [[Peer("a0", "n0"), Peer("b0", "n1")], [Peer("a1", "n0"), Peer("b1", "n1")]]
    p = plan_reshard(sources, [TargetState("t0", "n1"), TargetState("t1", "n0")])
    assert p.assign == {"t0": ("b0", "b1"), "t1": ("a0", "a1")}
    busy = [TargetState("x", phase="Pulling", sources=("a0", "a1"))]
    p = plan_reshard([[Peer("a0")], [Peer("a1")]], busy + [TargetState("t0")], max_fan_out=1)
    assert p.waiting == ("t0",) and not p.assign
    assert plan_reshard([[Peer("a0")], []], [TargetState("t0")]).exhausted == ("t0",)
    retry = TargetState("t0", failed_sources=frozenset({"a0", "a1"}))
    assert plan_reshard(sources, [retry]).assign == {"t0": ("b0", "b1")}


# -- RefitJob --------------------------------------------------------------------------


def rj(**kw: object) -> RefitJobSpec:
    return RefitJobSpec.model_validate(
        {"sourceRef": {"name": "src"}, "targets": {"matchLabels": {"x": "y"}}, **kw}
    )


def tp_source(tp: int, per_rank: int = 1, quantization: str = "none", label: str = LABEL) -> dict:
    members = [member(f"s{r}-{i}", r, f"fp{r}", "5") for r in range(tp) for i in range(per_rank)]
    st = ws_status(tp, members)
    return {
        "metadata": {"name": "src"},
        "spec": {
            "layout": {"tensorParallelSize": tp, "rankLabel": label, "quantization": quantization}
        },
        "status": {**st, "members": members},
    }


def job_world(src: dict, targets: dict[str, str | None], label: str = LABEL) -> World:
    live = {m["pod"] for m in src["status"]["members"]} | set(targets)
    labels = {t: ({} if r is None else {label: r}) for t, r in targets.items()}
    return World(src, {t: None for t in targets}, live, T0, labels=labels)


def entries(d) -> dict:
    return {e["pod"]: e for e in d.status.get("targets") or []}


def test_plain_pull_from_tp2_source_assigns_same_rank_replicas() -> None:
    d = compute_status(rj(), {}, 1, job_world(tp_source(2), {"t0": "0", "t1": "1"}))
    e = entries(d)
    assert e["t0"]["source"] == "s0-0" and e["t1"]["source"] == "s1-0"
    assert d.status["bytesTotal"] == 2 * 1000, (
        "each target holds one rank: half of the 2000-byte copy"
    )


def test_reshard_assigns_every_source_rank_in_order() -> None:
    d = compute_status(
        rj(transform={"type": "reshard", "targetTensorParallelSize": 1}),
        {},
        1,
        job_world(tp_source(2), {"t0": None}),
    )
    assert entries(d)["t0"]["source"] == "s0-0,s1-0", "a TP 1 target needs no rank label"
    d = compute_status(
        rj(transform={"type": "reshard", "targetTensorParallelSize": 2}),
        {},
        1,
        job_world(tp_source(1), {"t0": "0", "t1": "1"}),
    )
    assert {e["source"] for e in entries(d).values()} == {"s0-0"}


def test_target_without_rank_label_fails_with_a_clear_reason_others_proceed() -> None:
    src = tp_source(2, label="example.com/rank")
    d = compute_status(
        rj(), {}, 1, job_world(src, {"t0": "0", "bad": None, "big": "2"}, label="example.com/rank")
    )
    e = entries(d)
    assert e["t0"]["source"] == "s0-0"
    assert e["bad"]["phase"] == "Failed" and e["bad"]["reason"] == "MissingRankLabel"
    assert "example.com/rank" in e["bad"]["message"] and "source" not in e["bad"]
    assert e["big"]["reason"] == "RankOutOfRange" and "0..1" in e["big"]["message"]
    # t0 finishes: the job ends Failed, naming the unlabelled target's reason
    done = {
        "targets": [{**e["t0"], "phase": "Done", "bytes": 1000}],
        "version": "5",
        "startTime": "2026-01-01T00:00:00Z",
    }
    d = compute_status(
        rj(),
        done,
        1,
        job_world(src, {"t0": "0", "bad": None, "big": "2"}, label="example.com/rank"),
    )
    failed = cond(d.status, "Failed")
    assert d.status["phase"] == "Failed" and "MissingRankLabel" in failed["message"]


def test_fp8_block_needs_a_quantized_source() -> None:
    d = compute_status(
        rj(transform={"type": "fp8-block"}), {}, 1, job_world(tp_source(1), {"t0": None})
    )
    failed = cond(d.status, "Failed")
    assert d.status["phase"] == "Failed" and failed["reason"] == "SourceNotQuantized"
    assert "spec.layout.quantization: fp8-block" in failed["message"] and "targets" not in d.status
    d = compute_status(
        rj(transform={"type": "fp8-block"}),
        {},
        1,
        job_world(tp_source(1, quantization="fp8-block"), {"t0": None}),
    )
    assert d.status["phase"] == "Running" and entries(d)["t0"]["source"] == "s0-0"


def test_reshard_refuses_relay_strategies_and_double_buffer() -> None:
    from pydantic import ValidationError

    from ferry_operator.handlers.refit_transform import refusal

    for kw, reason, fix in (
        ({"strategy": {"type": "chain"}}, "UnsupportedStrategy", "strategy.type: direct"),
        ({"pause": {"mode": "doubleBuffer"}}, "UnsupportedPauseMode", "pause.mode: engine"),
    ):
        body = {"transform": {"type": "reshard", "targetTensorParallelSize": 1}, **kw}
        with pytest.raises(ValidationError, match=fix):  # the CRD's CEL rule says the same
            rj(**body)
        # An object admitted before the rule existed still fails fast, naming the fix.
        ((field, value),) = kw.items()
        unchecked = rj(transform=body["transform"]).model_copy(
            update={field: getattr(rj(**kw), field)}
        )
        failed = refusal(unchecked, tp_source(2))
        assert failed is not None and failed.reason == reason and fix in failed.message

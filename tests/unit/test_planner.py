"""The RefitJob planner: which source serves which target."""

from __future__ import annotations

from ferry_operator.planner import Peer, TargetState, plan


def targets(n: int, **kw: object) -> list[TargetState]:
    return [TargetState(f"t{i}", **kw) for i in range(n)]  # type: ignore[arg-type]


def test_direct_spreads_least_loaded_first() -> None:
    p = plan("direct", [Peer("s0"), Peer("s1")], targets(4), max_fan_out=4)
    counts = {s: sum(1 for v in p.assign.values() if v == (s,)) for s in ("s0", "s1")}
    assert counts == {"s0": 2, "s1": 2}


def test_direct_prefers_same_node() -> None:
    p = plan(
        "direct",
        [Peer("s0", "n0"), Peer("s1", "n1")],
        [TargetState("t0", "n1"), TargetState("t1", "n0")],
    )
    assert p.assign == {"t0": ("s1",), "t1": ("s0",)}


def test_direct_respects_fan_out_and_waits() -> None:
    busy = [TargetState("a", phase="Pulling", sources=("s0",))]
    p = plan("direct", [Peer("s0")], busy + targets(3), max_fan_out=2)
    assert len(p.assign) == 1 and len(p.waiting) == 2


def test_retry_avoids_the_failed_source() -> None:
    t = TargetState("t0", failed_sources=frozenset({"s0"}))
    p = plan("direct", [Peer("s0"), Peer("s1")], [t])
    assert p.assign == {"t0": ("s1",)}
    # when every source failed once, retry rather than give up
    t2 = TargetState("t1", failed_sources=frozenset({"s0", "s1"}))
    assert plan("direct", [Peer("s0"), Peer("s1")], [t2]).assign["t1"][0] in ("s0", "s1")


def test_no_sources_is_exhausted() -> None:
    assert plan("direct", [], targets(2)).exhausted == ("t0", "t1")


def test_parallel_sources_stripe_over_distinct_sources() -> None:
    p = plan("direct", [Peer("s0"), Peer("s1"), Peer("s2")], targets(1), parallel_sources=2)
    assert len(set(p.assign["t0"])) == 2


def test_tree_uses_finished_targets_as_sources() -> None:
    done = [TargetState("d0", phase="Done", sources=("s0",))]
    p = plan("tree", [Peer("s0")], done + targets(2), max_fan_out=1)
    assert sorted(v[0] for v in p.assign.values()) == ["d0", "s0"]


def test_tree_capacity_grows_geometrically() -> None:
    """With fan-out 1, each round doubles the holders: 7 targets need 3 rounds."""
    state = targets(7)
    rounds = 0
    while any(t.phase != "Done" for t in state):
        p = plan("tree", [Peer("s0")], state, max_fan_out=1)
        for t in state:
            if t.pod in p.assign:
                t.phase, t.sources = "Done", p.assign[t.pod]
        rounds += 1
    assert rounds == 3


def test_chain_links_targets_one_after_another() -> None:
    p = plan("chain", [Peer("s0")], targets(3))
    assert p.assign == {"t0": ("s0",), "t1": ("t0",), "t2": ("t1",)}


def test_chain_one_per_source_and_extends_existing() -> None:
    p = plan("chain", [Peer("s0"), Peer("s1")], targets(4))
    heads = sorted(v[0] for v in p.assign.values() if v[0].startswith("s"))
    assert heads == ["s0", "s1"]
    running = [TargetState("t0", phase="Pulling", sources=("s0",))]
    p2 = plan("chain", [Peer("s0")], running + [TargetState("t9")])
    assert p2.assign == {"t9": ("t0",)}


def test_chain_relinks_after_failed_upstream() -> None:
    state = [
        TargetState("t0", phase="Failed", sources=("s0",)),
        TargetState("t1", failed_sources=frozenset({"t0"})),
    ]
    p = plan("chain", [Peer("s0")], state)
    assert p.assign == {"t1": ("s0",)}

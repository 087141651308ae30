"""Continuous refit between real agents: targets follow a source's versions (ferry_agent.follow).

The source notifies its subscribed targets on each publish over their Follow streams,
each target pulls (directly or as a relay link), reports back, and the trainer's
publish_and_wait returns every target's outcome. No apiserver anywhere."""

from __future__ import annotations

import statistics
import time

import pytest
from agent_e2e_helpers import fill, mixed_specs, paint, snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STEPS = 10


def _wait(cond, timeout=20.0, what="condition"):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _fleet(cluster, n, specs, upstreams=None):  # type: ignore[no-untyped-def]
    """A source and n targets (declared, painted); target i follows the source, pulling
    from upstreams[i] (an index into the targets) when given."""
    src = cluster.agent("src")
    se = cluster.engine(src)
    se.declare(specs)
    targets, engines = [], []
    for i in range(n):
        t = cluster.agent(f"t{i}")
        e = cluster.engine(t)
        e.declare(specs)
        paint(e, 0xEE)
        targets.append(t)
        engines.append(e)
    for i, e in enumerate(engines):
        up = None if upstreams is None or upstreams[i] is None else targets[upstreams[i]].endpoint
        e.follow(src.endpoint, upstream=up, timeout_s=30)
    _wait(lambda: len(se.followers()["followers"]) == n, what=f"{n} followers subscribed")
    return src, se, targets, engines


def test_four_followers_serve_each_version_and_publish_returns_per_target(cluster):
    specs = mixed_specs(64, seed=11)
    _src, se, targets, engines = _fleet(cluster, 4, specs)
    names = {t.pod for t in targets}
    step_s = []
    for k in range(1, STEPS + 1):
        se.begin_write()
        want = fill(se, seed=100 + k)
        t0 = time.perf_counter()
        res = se.publish_and_wait(f"v{k}", timeout=30)
        step_s.append(time.perf_counter() - t0)
        assert res.ok, res.failed
        assert set(res.targets) == names
        for t in res.targets.values():
            assert t.version == f"v{k}" and t.bytes == sum(s.nbytes for s in specs)
            assert t.transport == "nixl" and t.seconds > 0
        for e in engines:  # every target serves exactly these bytes before the next step
            assert snapshot(e) == want
    for e in engines:
        (state,) = e.following().values()
        assert state["history"] == [f"v{k}" for k in range(1, STEPS + 1)]  # each, in order
        assert state["failures"] == 0
    med = statistics.median(step_s[2:])
    print(
        f"\nfollow: 4 followers, {sum(s.nbytes for s in specs) / 2**20:.1f} MiB, "
        f"publish_and_wait median {med * 1e3:.1f} ms/step over {STEPS - 2} warm steps"
    )


def test_chain_and_tree_links_relay_each_version(cluster):
    specs = mixed_specs(48, seed=12)
    # t0 <- source; t1 relays t0; t2 relays t1 (a chain); t3 relays t0 (a tree branch)
    _src, se, _targets, engines = _fleet(cluster, 4, specs, upstreams=[None, 0, 1, 0])
    for k in range(1, 5):
        se.begin_write()
        want = fill(se, seed=200 + k)
        res = se.publish_and_wait(f"c{k}", timeout=30)
        assert res.ok, res.failed
        for e in engines:
            assert snapshot(e) == want
    kinds = {n: t.transport for n, t in res.targets.items()}
    assert sorted(kinds.values()) == ["nixl", "relay", "relay", "relay"], kinds


def test_follower_added_mid_run_catches_up_and_removed_one_leaves(cluster):
    specs = mixed_specs(32, seed=13)
    src, se, targets, engines = _fleet(cluster, 2, specs)
    for k in (1, 2):
        se.begin_write()
        fill(se, seed=300 + k)
        assert se.publish_and_wait(f"m{k}", timeout=30).ok

    late = cluster.agent("late")
    le = cluster.engine(late)
    le.declare(specs)
    want = snapshot(se)
    le.follow(src.endpoint, timeout_s=30)  # joins at m2: pulled on subscribe, no publish

    # Subscribed first (no outcome yet: None), then its report of the catch-up pull arrives.
    def caught_up() -> bool:
        outcome = se.followers()["followers"].get(late.pod) or {}
        return snapshot(le) == want and outcome.get("version") == "m2"

    _wait(caught_up, what="the late follower to catch up and report m2")

    assert engines[1].unfollow()
    _wait(lambda: targets[1].pod not in se.followers()["followers"], what="the follower to leave")
    se.begin_write()
    want = fill(se, seed=303)
    res = se.publish_and_wait("m3", timeout=30)
    assert res.ok and set(res.targets) == {targets[0].pod, late.pod}
    assert snapshot(le) == want and snapshot(engines[0]) == want
    assert engines[1].following() == {}


def test_publish_and_wait_names_the_target_that_did_not_serve(cluster):
    specs = mixed_specs(16, seed=14)
    _src, se, targets, engines = _fleet(cluster, 2, specs)
    engines[1].declare(mixed_specs(16, seed=15))  # now a layout the source cannot fill
    se.begin_write()
    fill(se, seed=401)
    res = se.publish_and_wait("x1", timeout=20)
    assert not res.ok
    assert set(res.failed) == {targets[1].pod}
    bad = res.failed[targets[1].pod]
    assert bad.reason == "LayoutMismatch" and bad.message
    assert res.targets[targets[0].pod].ok

    # Waiting for a follower that never subscribed ends at the deadline, named.
    se.begin_write()
    fill(se, seed=402)
    res = se.publish_and_wait("x2", timeout=0.5, at_least=3)
    assert not res.ok and any(t.reason == "NotFollowing" for t in res.targets.values())

"""Content integrity with real agents: a source whose bytes change after it published
(one byte written straight into its slab, as a stray WRITE or a bad DIMM would) is
refused by the target before the version is served, and its engine never sees them."""

from __future__ import annotations

import threading
import time

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent import digests
from ferry_agent.errors import DigestMismatch, DigestsUnavailable
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# 16 tensors of 3 MiB: one digest piece each.
SPECS = [TensorSpec(f"w.{i}", "bfloat16", (1536, 1024)) for i in range(16)]


def _source(cluster, role, seed=11, version="v1"):
    p = cluster.agent(role)
    e = cluster.engine(p)
    e.declare(SPECS)
    want = fill(e, seed=seed)
    e.publish(version)
    return p, e, want


def _flip(engine, name, at=12345):
    """One byte of `name` changed in the source's slab, after publish, with no write fence."""
    p = next(p for p in engine.placements if p.name == name)
    engine.slabs[p.slab].array[p.offset + at] ^= 0x40


def _engine_thread(engine, events):
    def run():
        refit = engine.wait_refit(timeout=30)
        refit.ack()
        events.append(refit.wait_done(timeout=30))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    while engine.status()["subscribers"] < 1:
        time.sleep(0.01)
    return th


def test_flipped_byte_after_publish_is_refused_and_never_served(cluster):
    bad, bad_engine, want = _source(cluster, "bad")
    good, _, same = _source(cluster, "good")
    assert same == want
    _flip(bad_engine, "w.7")
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    events: list = []
    eng = _engine_thread(de, events)
    rpc = cluster.rpc(dst)

    with pytest.raises(DigestMismatch) as err:
        rpc.pull(PullRequest([bad.endpoint], quiesce=True, verify="full", timeout_s=30))
    eng.join(10)
    assert "w.7" in err.value.message and bad.endpoint in err.value.message
    assert any(d.startswith("w.7: bytes [0, ") for d in err.value.fields["differences"])
    health = rpc.health()
    assert (
        health.version == "" and health.state == "NoVersion"
    )  # nothing served: the slabs hold no version
    assert len(events) == 1 and events[0][1] is False  # the engine resumed: the pull failed

    reply = rpc.pull(PullRequest([good.endpoint], verify="full", timeout_s=30))
    assert reply.version == "v1" and reply.verified_pieces == len(SPECS)
    assert snapshot(de) == want
    served = cluster.rpc(good).digests("v1")
    assert reply.digest == served.total  # the target serves the origin's digests
    assert cluster.rpc(dst).digests("v1") == served


def test_double_buffer_never_swaps_in_bytes_that_do_not_match(cluster):
    src, se, v1 = _source(cluster, "src")
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    rpc = cluster.rpc(dst)
    rpc.pull(PullRequest([src.endpoint], timeout_s=30))
    with se.writing("v2"):
        fill(se, seed=12)
    _flip(se, "w.0")

    with pytest.raises(DigestMismatch):
        rpc.pull(
            PullRequest(
                [src.endpoint], double_buffer=True, quiesce=True, verify="full", timeout_s=30
            )
        )
    assert rpc.health().version == "v1"  # the active set still serves the old version
    de.attach()
    assert snapshot(de) == v1


def test_sampled_checks_a_rotating_eighth_and_off_checks_nothing(cluster):
    src, se, want = _source(cluster, "src")
    dst = cluster.agent("dst")
    cluster.engine(dst).declare(SPECS)
    rpc = cluster.rpc(dst)
    per_pull = -(-len(SPECS) // digests.SAMPLE_EVERY)
    for _ in range(2):
        reply = rpc.pull(PullRequest([src.endpoint], verify="sampled", timeout_s=30))
        assert reply.verified_pieces == per_pull
    assert rpc.pull(PullRequest([src.endpoint], verify="off", timeout_s=30)).verified_pieces == 0
    assert (
        rpc.pull(PullRequest([src.endpoint], timeout_s=30)).verified_pieces == per_pull
    )  # default


def test_sampled_pulls_find_a_flipped_byte_within_a_round_of_windows(cluster):
    src, se, _ = _source(cluster, "src")
    _flip(se, "w.3")
    dst = cluster.agent("dst")
    cluster.engine(dst).declare(SPECS)
    rpc = cluster.rpc(dst)
    outcomes = []
    for _ in range(digests.SAMPLE_EVERY):
        try:
            rpc.pull(PullRequest([src.endpoint], verify="sampled", timeout_s=30))
            outcomes.append("served")
        except DigestMismatch:
            outcomes.append("refused")
    assert "refused" in outcomes


def test_a_source_without_digests_is_refused_unless_verify_is_off(cluster):
    src = cluster.agent("src", "--digests", "off")
    se = cluster.engine(src)
    se.declare(SPECS)
    want = fill(se, seed=5)
    se.publish("v1")
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    rpc = cluster.rpc(dst)
    with pytest.raises(DigestsUnavailable, match="no content digests"):
        rpc.pull(PullRequest([src.endpoint], verify="sampled", timeout_s=30))
    assert rpc.health().version == ""
    reply = rpc.pull(PullRequest([src.endpoint], verify="off", timeout_s=30))
    assert reply.version == "v1" and reply.digest == "" and snapshot(de) == want


def test_an_unchecked_pull_hands_on_the_origins_digests_to_a_target_that_checks(cluster):
    """`verify: off` does not wait for the source's digests; a target pulling from it with
    `full` still checks against the origin's, fetched when it asks."""
    src, se, want = _source(cluster, "src")
    mid = cluster.agent("mid")
    cluster.engine(mid).declare(SPECS)
    reply = cluster.rpc(mid).pull(PullRequest([src.endpoint], verify="off", timeout_s=30))
    assert reply.verified_pieces == 0 and reply.digest == ""  # not fetched on the pull's path
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    reply = cluster.rpc(dst).pull(PullRequest([mid.endpoint], verify="full", timeout_s=30))
    assert reply.verified_pieces == len(SPECS)
    assert reply.digest == cluster.rpc(src).digests("v1").total
    assert snapshot(de) == want

"""Real agents, real NIXL READs over UCX loopback, bytes compared."""

from __future__ import annotations

import urllib.request

import pytest
from agent_e2e_helpers import fill, mixed_specs, paint, snapshot

from ferry_agent.errors import LayoutMismatch, Unauthenticated
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_pull_240_mixed_tensors_bytes_equal_and_second_cycle_reuses(cluster):
    specs = mixed_specs(240)
    src, dst = cluster.agent("src"), cluster.agent("dst")
    se, de = cluster.engine(src), cluster.engine(dst)
    se.declare(specs)
    de.declare(specs)
    want = fill(se, seed=1)
    se.publish("v1")
    paint(de, 0xEE)

    rpc = cluster.rpc(dst)
    first = rpc.pull(PullRequest([src.endpoint], version="v1", timeout_s=60))
    assert first.version == "v1"
    assert first.bytes == sum(s.nbytes for s in specs)
    assert snapshot(de) == want
    assert 1 < first.descriptors < len(specs)  # coalesced, then chunked
    assert first.dlists_prepared == 1 and first.remote_agents_added >= 1  # one per lane

    # Cycle 2: new bytes under a new version; nothing re-registered or re-prepared.
    with se.writing("v2"):
        want2 = fill(se, seed=2)
    second = rpc.pull(PullRequest([src.endpoint], timeout_s=60))
    assert second.version == "v2"
    assert snapshot(de) == want2
    assert second.registrations == 0
    assert second.dlists_prepared == 0 and second.dlists_reused == 1
    assert second.remote_agents_added == 0 and second.xfer_handles_created == 0
    assert rpc.health().version == "v2"

    body = urllib.request.urlopen(
        f"http://127.0.0.1:{dst.ready['metrics_port']}/metrics", timeout=5
    ).read()
    moved = [
        ln
        for ln in body.decode().splitlines()
        if ln.startswith('ferry_agent_bytes_moved_total{direction="in"}')
    ]
    assert moved and float(moved[0].split()[-1]) == 2 * first.bytes


def test_two_sources_striped_into_one_target(cluster):
    specs = mixed_specs(200, seed=3)
    a, b, dst = cluster.agent("srca"), cluster.agent("srcb"), cluster.agent("dst")
    ea, eb, ed = cluster.engine(a), cluster.engine(b), cluster.engine(dst)
    for e in (ea, eb, ed):
        e.declare(specs)
    want = fill(ea, seed=5)
    assert fill(eb, seed=5) == want
    ea.publish("s1")
    eb.publish("s1")
    reply = cluster.rpc(dst).pull(PullRequest([a.endpoint, b.endpoint], timeout_s=60))
    assert snapshot(ed) == want
    per = dict(reply.source_bytes)
    assert set(per) == {a.endpoint, b.endpoint}
    assert all(v > 0.3 * reply.bytes for v in per.values())  # both sources carried a share


def test_layout_mismatch_refused_before_any_byte_moves(cluster):
    specs = mixed_specs(200, seed=4)
    bad = list(specs)
    bad[10] = TensorSpec(
        bad[10].name, "float64" if bad[10].dtype != "float64" else "int32", bad[10].shape
    )
    del bad[20]
    src, dst = cluster.agent("src"), cluster.agent("dst")
    se, de = cluster.engine(src), cluster.engine(dst)
    se.declare(specs)
    de.declare(bad)
    fill(se, seed=1)
    se.publish("v1")
    paint(de, 0xAB)
    before = snapshot(de)
    with pytest.raises(LayoutMismatch) as err:
        cluster.rpc(dst).pull(PullRequest([src.endpoint], timeout_s=30))
    assert specs[10].name in str(err.value) and specs[20].name in str(err.value)
    assert any(specs[10].name in d for d in err.value.differences)
    assert snapshot(de) == before
    assert all(b == 0xAB for s in de.slabs for b in s.array[::4096])
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{dst.ready['metrics_port']}/metrics", timeout=5
    )
    assert (
        'ferry_agent_transfer_failures_total{reason="LayoutMismatch"} 1.0' in body.read().decode()
    )


def test_fresh_target_adopts_layout_and_engine_attaches(cluster):
    specs = mixed_specs(200, seed=6)
    src, dst = cluster.agent("src"), cluster.agent("dst")
    se = cluster.engine(src)
    se.declare(specs)
    want = fill(se, seed=9)
    se.publish("v7")
    reply = cluster.rpc(dst).pull(PullRequest([src.endpoint], timeout_s=60))
    assert reply.registrations > 0 and reply.registrations % len(se.slabs) == 0  # per lane
    assert reply.register_s > 0
    de = cluster.engine(dst)
    views = de.attach()
    assert set(views) == {s.name for s in specs}
    assert snapshot(de) == want


def test_unauthenticated_calls_are_refused(cluster):
    src = cluster.agent("src")
    with pytest.raises(Unauthenticated):
        cluster.rpc(src, token="wrong").health()
    assert cluster.rpc(src).health().ok


def test_pull_forced_onto_tcp_by_ucx_tls_warns_once_naming_why(cluster):
    """Two host-memory agents on one host share memory (UCX cma/sm); with UCX_TLS=tcp
    the pull still lands, and the target's log says it fell back to TCP and why."""
    specs = mixed_specs(40, seed=5)
    env = {"UCX_TLS": "tcp"}
    src, dst = cluster.spawn("src", env=env), cluster.spawn("dst", env=env)
    se, de = cluster.engine(src), cluster.engine(dst)
    se.declare(specs)
    de.declare(specs)
    want = fill(se, seed=5)
    se.publish("v1")
    rpc = cluster.rpc(dst)
    rpc.pull(PullRequest([src.endpoint], version="v1", timeout_s=60))
    with se.writing("v2"):
        want = fill(se, seed=6)
    rpc.pull(PullRequest([src.endpoint], version="v2", timeout_s=60))
    assert snapshot(de) == want
    said = [ln for ln in dst.log().splitlines() if "falls back to TCP" in ln]
    assert len(said) == 1, said  # once per source, not per pull
    assert src.endpoint in said[0] and "UCX_TLS=tcp leaves out shared memory" in said[0]
    assert "falls back to TCP" not in src.log()

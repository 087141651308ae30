"""Issue 19: a source can make a fresh target allocate unbounded memory. A target with
no layout adopts its source's; that layout is now bounded by the WeightSource's
status.bytes (PullRequest.max_bytes), by the agent's own --max-slab-bytes, and its
fingerprint must be the WeightSource's (PullRequest.fingerprint). Each is refused
before anything is allocated, with a typed error naming the limit."""

from __future__ import annotations

import glob

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.errors import LayoutMismatch, LayoutTooLarge
from ferry_agent.layout import TensorSpec, fingerprint
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# 16 MiB in 8 tensors: what the source claims to hold.
SPECS = [TensorSpec(f"w.{i}", "float32", (1024, 512)) for i in range(8)]
NBYTES = sum(s.nbytes for s in SPECS)


def _source(cluster):
    src = cluster.agent("src")
    se = cluster.engine(src)
    se.declare(SPECS)
    want = fill(se, seed=3)
    se.publish("v1")
    return src, want


def _slab_files(p) -> list[str]:
    return glob.glob(f"/dev/shm/ferry-{p.pod}_r0_*")


def _attached(cluster, p):
    c = cluster.engine(p)
    c.attach()
    return c


def _assert_nothing_allocated(cluster, dst, state: str = "Empty") -> None:
    """No slab exists; `state`: Empty after a refused pull, Failed after the engine's own
    declare was refused (a rank whose declare failed says so until one succeeds)."""
    assert cluster.rpc(dst).health().state == state
    assert _slab_files(dst) == [], "slabs were allocated for a refused layout"


def test_fresh_target_refuses_a_layout_larger_than_the_weightsources_bytes(cluster):
    src, want = _source(cluster)
    dst = cluster.agent("dst")
    rpc = cluster.rpc(dst)
    with pytest.raises(LayoutTooLarge) as err:
        rpc.pull(PullRequest([src.endpoint], max_bytes=NBYTES // 4, timeout_s=30))
    assert "max_bytes" in err.value.message and str(NBYTES) in err.value.message
    _assert_nothing_allocated(cluster, dst)
    # The bound is a bound: the honest size passes.
    reply = rpc.pull(PullRequest([src.endpoint], max_bytes=NBYTES, timeout_s=30))
    assert reply.version == "v1" and snapshot(_attached(cluster, dst)) == want


def test_fresh_target_refuses_a_layout_larger_than_its_max_slab_bytes(cluster):
    src, _ = _source(cluster)
    dst = cluster.agent("dst", "--max-slab-bytes", "8Mi")
    with pytest.raises(LayoutTooLarge) as err:
        cluster.rpc(dst).pull(PullRequest([src.endpoint], timeout_s=30))
    assert "--max-slab-bytes" in err.value.message
    _assert_nothing_allocated(cluster, dst)
    # The engine's own declare is held to the same limit.
    with pytest.raises(LayoutTooLarge):
        cluster.engine(dst).declare(SPECS)
    _assert_nothing_allocated(cluster, dst, state="Failed")


def test_fresh_target_refuses_a_source_whose_fingerprint_is_not_the_weightsources(cluster):
    src, want = _source(cluster)
    dst = cluster.agent("dst")
    rpc = cluster.rpc(dst)
    other = fingerprint(SPECS[:-1])
    with pytest.raises(LayoutMismatch) as err:
        rpc.pull(PullRequest([src.endpoint], fingerprint=other, timeout_s=30))
    assert other in err.value.message and "fingerprint" in err.value.message
    _assert_nothing_allocated(cluster, dst)
    reply = rpc.pull(PullRequest([src.endpoint], fingerprint=fingerprint(SPECS), timeout_s=30))
    assert reply.version == "v1" and snapshot(_attached(cluster, dst)) == want

"""One agent process serving several local ranks (GPUs) of its pod: in host memory each
rank is simulated with its own slabs and NIXL agents, so multi-GPU pods run here."""

from __future__ import annotations

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.client import EngineClient
from ferry_agent.errors import FerryError
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def shard(rank: int) -> list[TensorSpec]:
    """Rank r's shard: the same names, shapes that differ per rank (as TP shards can)."""
    return [TensorSpec(f"layers.{i}.w", "bfloat16", (128 + 32 * rank, 256)) for i in range(6)]


def test_two_rank_pods_refit_each_rank_from_the_same_rank(cluster):
    src = cluster.agent("src", "--ranks", "2")
    dst = cluster.agent("dst", "--ranks", "2")
    assert src.ready["ranks"] == 2
    want = {}
    for r in (0, 1):
        se = cluster.track(EngineClient(src.socket, timeout=30, rank=r))
        se.declare(shard(r))
        want[r] = fill(se, seed=10 + r)
        se.publish("step-1")
    rpc = cluster.rpc(dst)
    for r in (0, 1):
        reply = rpc.pull(PullRequest([f"{src.endpoint}/{r}"], rank=r, timeout_s=60))
        assert reply.version == "step-1"
    for r in (0, 1):
        de = cluster.track(EngineClient(dst.socket, timeout=30, rank=r))
        de.attach()
        assert snapshot(de) == want[r], f"rank {r}"
        assert [p.shape for p in de.placements] == [s.shape for s in shard(r)]
    # Rank 0's target pulling rank 1's shard is a layout mismatch, refused before a byte moves.
    with pytest.raises(FerryError) as exc:
        rpc.pull(PullRequest([f"{src.endpoint}/1"], rank=0, timeout_s=30))
    assert exc.value.reason == "LayoutMismatch"
    # A rank the pod does not have is refused by name.
    with pytest.raises(FerryError) as exc:
        rpc.pull(PullRequest([f"{src.endpoint}/0"], rank=2, timeout_s=30))
    assert exc.value.reason == "BadRequest" and "0..1" in str(exc.value)


def test_an_engine_worker_sees_only_its_own_ranks_slabs(cluster):
    p = cluster.agent("pod", "--ranks", "2")
    a = cluster.track(EngineClient(p.socket, timeout=30, rank=0))
    b = cluster.track(EngineClient(p.socket, timeout=30, rank=1))
    a.declare(shard(0))
    b.declare(shard(1))
    fill(a, seed=1)
    shared = {s.name for s in a.slabs} & {s.name for s in b.slabs}
    assert not shared, "two ranks must not share slabs"
    assert a.status()["rank"] == 0 and b.status()["rank"] == 1
    with pytest.raises(FerryError, match="out of range"):
        cluster.track(EngineClient(p.socket, timeout=30, rank=5)).status()

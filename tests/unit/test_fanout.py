"""The fan-out model (ferry bench fanout): planner schedules timed by a bandwidth model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from ferry_bench import fanout
from ferry_bench.fanout import GPU, chain_done, chunks, landings, predict, single_s
from ferry_bench.fanout_check import calibrate

GB = 10**9
W = 8 * GB
NIC_ONLY = replace(GPU, gpus_per_node=1)  # every pod its own node: one kind of link


def seconds(strategy: str, n: int, sources: int = 1, nbytes: int = W, p=GPU) -> float:
    return predict(strategy, n, sources, nbytes, p).seconds


def test_single_transfer_is_bytes_over_the_nic_plus_fixed_costs() -> None:
    descriptors = math.ceil(W / GPU.chunk_bytes)
    want = W / (GPU.nic_GBps * 1e9) + GPU.per_pull_s + descriptors * GPU.per_descriptor_s
    assert single_s(W, "nic", GPU) == pytest.approx(want, rel=1e-9)
    assert single_s(W, "nvlink", GPU) < single_s(W, "nic", GPU) / 7
    for strategy in fanout.STRATEGIES:
        assert seconds(strategy, 1) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("strategy", fanout.STRATEGIES)
def test_time_never_falls_as_targets_grow(strategy: str) -> None:
    ts = [seconds(strategy, n) for n in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert all(b >= a - 1e-9 for a, b in zip(ts, ts[1:], strict=False))


def test_direct_is_limited_by_the_source_nic() -> None:
    for n in (8, 64):
        floor = n * W / (GPU.nic_GBps * 1e9)  # every byte leaves through one NIC
        assert floor <= seconds("direct", n) <= 1.02 * floor
    # eight sources have eight NICs
    assert seconds("direct", 64, sources=8) == pytest.approx(seconds("direct", 64) / 8, rel=0.02)


def test_tree_rounds_grow_with_log_n() -> None:
    p = replace(NIC_ONLY, max_fan_out=1)
    one = single_s(W, "nic", p)
    for n in (1, 2, 3, 7, 8, 31, 100):
        r = predict("tree", n, 1, W, p)
        depth = math.ceil(math.log2(n + 1))
        assert r.rounds == depth and r.depth <= depth
        assert r.seconds == pytest.approx(depth * one, rel=1e-6)
    # fan-out 4 shares a holder's NIC four ways but multiplies holders by 5 per round
    r = predict("tree", 4096, 1, W, GPU)
    assert r.depth <= math.ceil(math.log(4097, 5)) + 1
    assert r.seconds < seconds("direct", 4096) / 100


def test_chain_is_nearly_flat_in_n() -> None:
    one = seconds("chain", 1)
    assert seconds("chain", 8) <= 1.3 * one  # the goal, 8 GB from one source
    # each extra link costs on average at most its relay lag, its setup (a relay starts once
    # its upstream pulls) and one chunk's copy over a NIC
    chunk = GPU.chunk_bytes / (GPU.nic_GBps * 1e9) + GPU.per_descriptor_s
    hop = GPU.relay_lag_s + GPU.per_pull_s + chunk
    for n in (2, 8, 9, 32, 65):
        assert 0 < seconds("chain", n) - one <= (n - 1) * hop
    # with big weights the per-link latency is noise next to the transfer
    assert seconds("chain", 64, nbytes=140 * GB) <= 1.15 * seconds("chain", 1, nbytes=140 * GB)
    assert seconds("chain", 64) < seconds("tree", 64) < seconds("direct", 64)


def test_chain_links_are_the_planners_chains() -> None:
    r = predict("chain", 16, 1, W, GPU)
    # one chain in name order: source -> n0000-g0 .. g7 (NVLink inside a node) -> n0001-g0 ..
    assert r.depth == 16 and r.links == {"nic": 2, "nvlink": 14}
    assert r.done_s == sorted(r.done_s)
    # the planner deals targets round-robin over the chains, so with a source per GPU every
    # hop crosses nodes (chains are not node-aware)
    assert predict("chain", 64, 8, W, GPU).links == {"nic": 64}


def test_the_model_asks_the_real_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = fanout.plan

    def spy(strategy, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(strategy)
        return real(strategy, *a, **kw)

    monkeypatch.setattr(fanout, "plan", spy)
    predict("tree", 8, 1, W, GPU)
    predict("chain", 8, 1, W, GPU)
    assert calls.count("chain") == 1 and calls.count("tree") >= 2  # tree replans on completion


def test_a_paced_relay_follows_one_lag_behind_and_an_unpaced_one_a_chunk_behind() -> None:
    sizes = chunks(96 << 20, 4 << 20)
    paced = replace(GPU, nic_GBps=5.0, pace_GBps=0.05, relay_lag_s=0.005, per_descriptor_s=0.0)
    up = landings(sizes, "nic", paced, 0.0)
    assert up[-1] == pytest.approx((4 << 20) / 5e9 + (92 << 20) / 5e7)
    down = landings(sizes, "nic", paced, 0.0, upstream=up)
    assert np.allclose(down - up, 0.005 + (4 << 20) / 5e9)
    plain = landings(sizes, "nic", GPU, 0.0)
    follow = landings(sizes, "nic", GPU, 0.0, upstream=plain)
    chunk = (4 << 20) / (GPU.nic_GBps * 1e9) + GPU.per_descriptor_s
    assert np.allclose(follow - plain, GPU.relay_lag_s + chunk)
    # a late relay start delays the whole link
    assert chain_done(["nic", "nic"], 96 << 20, GPU, setup=1.0)[1] > 2.0


def test_host_calibration_reproduces_the_single_transfer() -> None:
    p = calibrate(
        96 << 20, 4 << 20, 0.05, unpaced_read_s=0.03, paced_wall_s=2.1, rpc_s=4e-4, max_fan_out=1
    )
    assert single_s(96 << 20, "nic", p) == pytest.approx(2.1)
    assert predict("direct", 3, 1, 96 << 20, p).seconds == pytest.approx(3 * 2.1)

"""Cancellation, progress, chain relays and double buffering with real agent processes.

Pulls are paced (max_gbps) so that "mid-pull" and durations are reliable on 2 cores."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.errors import Cancelled, FerryError
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# 24 MiB in 1 MiB chunks; at 0.015 GB/s a pull takes ~1.7 s.
SPECS = [TensorSpec(f"w.{i}", "bfloat16", (768, 1024)) for i in range(16)]
TOTAL = sum(s.nbytes for s in SPECS)
PACE = 0.015


def _source(cluster, version="v1", seed=11):
    src = cluster.agent("src")
    se = cluster.engine(src)
    se.declare(SPECS)
    want = fill(se, seed=seed)
    se.publish(version)
    return src, se, want


def _in_thread(fn, *a, **kw):
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["reply"] = fn(*a, **kw)
        except FerryError as exc:
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0
        out["end"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _wait_state(rpc, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while rpc.health().state != state:
        assert time.monotonic() < deadline, f"never {state}"
        time.sleep(0.01)


def test_cancel_mid_pull_stops_within_a_second_and_the_next_pull_works(cluster):
    src, se, want = _source(cluster)
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    events: list = []

    def engine():
        refit = de.wait_refit(timeout=30)
        refit.ack()
        events.append(refit.wait_done(timeout=30))

    eng = threading.Thread(target=engine, daemon=True)
    eng.start()
    while de.status()["subscribers"] < 1:
        time.sleep(0.01)
    rpc = cluster.rpc(dst)
    cancel = threading.Event()
    th, out = _in_thread(
        rpc.pull,
        PullRequest([src.endpoint], max_gbps=PACE, quiesce=True, timeout_s=30),
        cancel=cancel,
    )
    _wait_state(rpc, "Pulling")
    time.sleep(0.3)
    cancel.set()
    cancelled = time.monotonic()
    th.join(5)
    assert isinstance(out.get("error"), Cancelled), out
    _wait_state(rpc, "NoVersion", timeout=1.0)  # the agent let go of the slabs
    assert time.monotonic() - cancelled < 1.0
    eng.join(5)
    assert events == [("", False)]  # engine resumed, told its slabs hold no version
    assert rpc.health().version == ""

    reply = rpc.pull(PullRequest([src.endpoint], timeout_s=30))  # handles were released cleanly
    assert reply.version == "v1" and snapshot(de) == want


# The pulling agent runs in its own process (NIXL and UCX stay out of pytest's): it
# prints each progress callback as "t bytes", then the result.
PROGRESS_SCRIPT = """
import json, sys, time
from ferry_agent.agent import Agent, AgentConfig
from ferry_agent.request import PullRequest
a = Agent(AgentConfig(pod=sys.argv[1], token=sys.argv[2], slab_bytes=4 << 20)).start()
t0 = time.monotonic()
seen = []
r = a.pull(PullRequest([sys.argv[3]], chunk_bytes=1 << 20, max_gbps=float(sys.argv[4]), timeout_s=30),
           progress=lambda n: seen.append((time.monotonic() - t0, n)))
rank = a.rank(0)
got = {p.name: rank.slabs[p.slab].array[p.offset : p.offset + p.nbytes].tobytes().hex()
       for p in rank.layout.placements}
print(json.dumps({"seen": seen, "bytes": r.bytes, "total_s": r.total_s, "got": got}))
a.close()
"""


def test_progress_reports_increasing_bytes_while_chunks_land(cluster, token):
    import json
    import subprocess
    import sys

    src, se, want = _source(cluster)
    pod = f"prog-{secrets.token_hex(3)}"
    out = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT, pod, token, src.endpoint, str(PACE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    seen = [(t, n) for t, n in res["seen"]]
    values = [n for _, n in seen]
    assert values == sorted(values) and values[-1] == res["bytes"] == TOTAL
    assert len(set(values)) >= 5, values  # many updates, not just the end
    mid = [n for t, n in seen if t < 0.8 * res["total_s"]]
    assert mid and 0 < max(mid) < TOTAL  # partial counts arrive during the pull
    assert {k: bytes.fromhex(v) for k, v in res["got"].items()} == want


def test_chain_relay_three_targets_take_little_more_than_one_transfer(cluster):
    src, se, want = _source(cluster)
    rpcs = [cluster.rpc(cluster.agent(f"t{k}")) for k in range(3)]
    endpoints = [src.endpoint] + [r.endpoint for r in rpcs]

    # Baseline: one paced transfer into a fresh target.
    t0 = time.monotonic()
    base = cluster.rpc(cluster.agent("base")).pull(
        PullRequest([src.endpoint], max_gbps=PACE, timeout_s=30)
    )
    single = time.monotonic() - t0

    # Chain: every link starts at once; t1 and t2 are still empty (no layout) when
    # their downstreams start following them.
    t0 = time.monotonic()
    runs = [
        _in_thread(
            rpcs[k].pull, PullRequest([endpoints[k]], max_gbps=PACE, timeout_s=60, relay=k > 0)
        )
        for k in (2, 1, 0)
    ]
    for th, _ in runs:
        th.join(60)
    outs = [out for _, out in runs]
    assert all("reply" in o for o in outs), outs
    chain = max(o["end"] for o in outs) - t0
    assert base.bytes == TOTAL and all(o["reply"].bytes == TOTAL for o in outs)
    for r in rpcs:
        assert r.health().version == "v1"
    for k in range(3):
        de = cluster.engine(cluster.procs[1 + k])
        de.attach()
        assert snapshot(de) == want
    assert chain < 1.6 * single, f"chain {chain:.2f}s vs single {single:.2f}s"


def test_relay_whose_upstream_fails_reports_relay_broken(cluster):
    src, se, want = _source(cluster)
    up, down = cluster.agent("up"), cluster.agent("down")
    rup, rdown = cluster.rpc(up), cluster.rpc(down)
    th_up, out_up = _in_thread(rup.pull, PullRequest([src.endpoint], max_gbps=PACE, timeout_s=30))
    th_dn, out_dn = _in_thread(
        rdown.pull, PullRequest([up.endpoint], max_gbps=PACE, timeout_s=30, relay=True)
    )
    _wait_state(rdown, "Pulling")
    time.sleep(0.3)
    src.kill()  # the upstream's pull fails mid-way
    th_up.join(30)
    th_dn.join(30)
    assert "error" in out_up
    assert out_dn["error"].reason in ("RelayBroken", "PeerUnavailable"), out_dn
    assert rdown.health().version == ""


def _digest(chunks) -> str:
    h = hashlib.blake2b(digest_size=8)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _read_views(views) -> str:
    import torch

    return _digest(v.view(torch.uint8).numpy().tobytes() for v in views.values())


def test_double_buffer_engine_reads_during_the_pull_and_pauses_only_for_the_swap(cluster):
    src, se, v1 = _source(cluster)
    dst = cluster.agent("dst")
    de = cluster.engine(dst)
    de.declare(SPECS)
    rpc = cluster.rpc(dst)
    rpc.pull(PullRequest([src.endpoint], timeout_s=30))
    with se.writing("v2"):
        v2 = fill(se, seed=12)
    d1, d2 = _digest(v1.values()), _digest(v2.values())

    reads: list[tuple[float, str]] = []
    pauses: list[tuple[float, float, str, bool, int | None]] = []
    stop = threading.Event()

    def engine():
        from ferry_agent.client import EngineClient

        with EngineClient(dst.socket, timeout=30) as c:
            views = c.attach()
            c.subscribe()
            while not stop.is_set():
                refit = c.wait_refit(timeout=0.001)
                if refit is None:
                    reads.append((time.monotonic(), _read_views(views)))
                    continue
                t_ack = time.monotonic()
                refit.ack()
                version, ok = refit.wait_done(timeout=30)
                pauses.append((t_ack, time.monotonic(), version, ok, refit.generation))
                views = c.attach()  # the swap moved the weights to the other slab set

    eng = threading.Thread(target=engine, daemon=True)
    eng.start()
    while de.status()["subscribers"] < 1 or not reads:
        time.sleep(0.01)
    t0 = time.monotonic()
    reply = rpc.pull(
        PullRequest([src.endpoint], double_buffer=True, quiesce=True, max_gbps=PACE, timeout_s=30)
    )
    t1 = time.monotonic()
    time.sleep(0.2)
    # A second cycle lands in the other set again, with nothing newly registered.
    with se.writing("v3"):
        fill(se, seed=13)
    again = rpc.pull(PullRequest([src.endpoint], double_buffer=True, quiesce=True, timeout_s=30))
    time.sleep(0.2)
    stop.set()
    eng.join(10)

    assert reply.version == "v2" and again.version == "v3"
    assert again.registrations == 0
    (ack, resumed, version, ok, generation), _ = pauses
    assert (version, ok) == ("v2", True) and generation is not None
    pull_s, pause_s = t1 - t0, resumed - ack
    during = [d for t, d in reads if t0 < t < ack]
    assert len(during) >= 10, "the engine kept reading during the pull"
    assert set(during) == {d1}, "only old-version bytes before the swap"
    after = [d for t, d in reads if resumed < t < pauses[1][0]]
    assert after and set(after) == {d2}, "only new-version bytes after the swap"
    assert pause_s < 0.1 * pull_s, f"paused {pause_s * 1e3:.0f} ms of a {pull_s:.2f}s pull"
    print(f"double buffer: pull {pull_s:.2f}s, engine paused {pause_s * 1e3:.1f} ms")

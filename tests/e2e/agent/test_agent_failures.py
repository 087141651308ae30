"""Failure modes with real processes: a source dies or changes version mid-pull;
the engine pause handshake. Pulls are paced (max_gbps) so "mid-pull" is reliable."""

from __future__ import annotations

import threading
import time

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.errors import (
    EngineNotQuiesced,
    FerryError,
    PeerUnavailable,
    TransferFailed,
    TransferTimeout,
    VersionChanged,
)
from ferry_agent.layout import TensorSpec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# 48 MiB in 1 MiB chunks at 0.03 GB/s: a pull takes ~1.7 s.
SPECS = [TensorSpec(f"w.{i}", "bfloat16", (1536, 1024)) for i in range(16)]
PACE_GBPS = 0.03


def _start_pull(rpc, sources, **kw):
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["reply"] = rpc.pull(sources, max_gbps=PACE_GBPS, **kw)
        except FerryError as exc:
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _pair(cluster, version="v1"):
    src, dst = cluster.agent("src"), cluster.agent("dst")
    se, de = cluster.engine(src), cluster.engine(dst)
    se.declare(SPECS)
    de.declare(SPECS)
    want = fill(se, seed=11)
    se.publish(version)
    return src, dst, se, de, want


def _wait_pulling(rpc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while rpc.health().state != "Pulling":
        assert time.monotonic() < deadline, "pull never started"
        time.sleep(0.01)


def test_source_killed_mid_pull_gives_typed_error_within_deadline(cluster):
    src, dst, se, de, _ = _pair(cluster)
    rpc = cluster.rpc(dst)
    th, out = _start_pull(rpc, [src.endpoint], timeout_s=8)
    _wait_pulling(rpc)
    time.sleep(0.2)
    src.kill()
    th.join(30)
    assert not th.is_alive()
    assert "reply" not in out, "a pull from a killed source must not succeed"
    assert isinstance(out["error"], PeerUnavailable | TransferFailed | TransferTimeout)
    assert out["elapsed"] < 8 + 5
    health = rpc.health()
    assert health.version == "" and health.state != "Pulling"  # partial bytes are not served


def test_version_change_mid_pull_is_detected(cluster):
    src, dst, se, de, _ = _pair(cluster)
    rpc = cluster.rpc(dst)
    th, out = _start_pull(rpc, [src.endpoint], version="v1", timeout_s=30)
    _wait_pulling(rpc)
    se.begin_write()
    time.sleep(0.1)
    se.publish("v2")
    th.join(40)
    assert isinstance(out.get("error"), VersionChanged), out
    assert rpc.health().version == ""


def test_version_change_mid_pull_retries_latest_and_lands_on_new_version(cluster):
    src, dst, se, de, _ = _pair(cluster)
    rpc = cluster.rpc(dst)
    th, out = _start_pull(rpc, [src.endpoint], timeout_s=60, retries=3)
    _wait_pulling(rpc)
    with se.writing("v2"):
        want2 = fill(se, seed=12)
    th.join(60)
    reply = out.get("reply")
    assert reply is not None, out
    assert reply.version == "v2" and reply.attempts >= 2
    assert snapshot(de) == want2


def test_engine_is_paused_and_resumed_around_a_pull(cluster):
    src, dst, se, de, want = _pair(cluster)
    events: list = []

    def engine_loop():
        refit = de.wait_refit(timeout=30)
        events.append(("pause", refit.version, cluster.rpc(dst).health().state))
        refit.ack()
        events.append(("resume", *refit.wait_done(timeout=30)))

    th = threading.Thread(target=engine_loop, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while de.status()["subscribers"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reply = cluster.rpc(dst).pull(
        [src.endpoint], quiesce_engine=True, quiesce_timeout_s=10, timeout_s=30
    )
    th.join(10)
    assert reply.version == "v1"
    assert events[0][:2] == ("pause", "v1")
    assert events[0][2] == "Declared"  # paused before any byte was written
    assert events[1] == ("resume", "v1", True)
    assert snapshot(de) == want


def test_engine_that_never_acks_fails_the_pull_untouched(cluster):
    src, dst, se, de, _ = _pair(cluster)
    de.subscribe()  # subscribed, but never reads the pause event
    before = snapshot(de)
    with pytest.raises(EngineNotQuiesced):
        cluster.rpc(dst).pull(
            [src.endpoint], quiesce_engine=True, quiesce_timeout_s=0.5, timeout_s=30
        )
    assert snapshot(de) == before

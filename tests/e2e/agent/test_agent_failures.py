"""Failure modes with real processes: a source dies or changes version mid-pull;
the engine pause handshake. Pulls are paced (max_gbps) so "mid-pull" is reliable."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from agent_e2e_helpers import fill, snapshot

from ferry_agent.errors import (
    EngineNotQuiesced,
    FerryError,
    PeerUnavailable,
    SourceStalled,
    TransferFailed,
    TransferTimeout,
    VersionChanged,
)
from ferry_agent.layout import TensorSpec
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# 48 MiB in 1 MiB chunks at 0.03 GB/s: a pull takes ~1.7 s.
SPECS = [TensorSpec(f"w.{i}", "bfloat16", (1536, 1024)) for i in range(16)]
PACE_GBPS = 0.03


def _start_pull(rpc, sources, **kw):
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["reply"] = rpc.pull(PullRequest(sources, max_gbps=PACE_GBPS, **kw))
        except FerryError as exc:
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _pair(cluster, version="v1", header_memory="host"):
    args = ("--header-memory", header_memory)
    src, dst = cluster.agent("src", *args), cluster.agent("dst", *args)
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


# A frozen source (SIGSTOP: its process hangs, its host header file still reads as
# published) lands no more bytes: the pull fails as stalled after stall_timeout_s, long
# before its deadline, so the operator can retry it on another source.
@pytest.mark.parametrize("header_memory", ["host", "slab"])
def test_frozen_source_fails_the_pull_as_stalled_before_its_deadline(cluster, header_memory):
    src, dst, *_ = _pair(cluster, header_memory=header_memory)
    rpc = cluster.rpc(dst)
    th, out = _start_pull(rpc, [src.endpoint], timeout_s=60, stall_timeout_s=2)
    _wait_pulling(rpc)
    time.sleep(0.2)
    os.kill(src.proc.pid, signal.SIGSTOP)
    try:
        th.join(30)
    finally:
        os.kill(src.proc.pid, signal.SIGCONT)
    assert not th.is_alive()
    assert "reply" not in out, "a pull from a frozen source must not succeed"
    # With NIXL-only headers the in-flight fence (a header READ, then the peer's RPC)
    # may find the hang first.
    expect = (
        SourceStalled
        if header_memory == "host"
        else SourceStalled | TransferTimeout | PeerUnavailable
    )
    assert isinstance(out["error"], expect), out["error"]
    assert out["elapsed"] < 2 + 10, out
    assert rpc.health().version == ""


# The fence reads the source's version header: "host" headers from the file it shares
# with a same-pod target, "slab" headers over NIXL (what a target on another host does).
@pytest.mark.parametrize("header_memory", ["host", "slab"])
def test_version_change_mid_pull_is_detected(cluster, header_memory):
    src, dst, se, de, _ = _pair(cluster, header_memory=header_memory)
    rpc = cluster.rpc(dst)
    th, out = _start_pull(rpc, [src.endpoint], version="v1", timeout_s=30)
    _wait_pulling(rpc)
    se.begin_write()
    time.sleep(0.1)
    se.publish("v2")
    th.join(40)
    assert isinstance(out.get("error"), VersionChanged), out
    assert rpc.health().version == ""


@pytest.mark.parametrize("header_memory", ["host", "slab"])
def test_version_change_mid_pull_retries_latest_and_lands_on_new_version(cluster, header_memory):
    src, dst, se, de, _ = _pair(cluster, header_memory=header_memory)
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
        PullRequest([src.endpoint], quiesce=True, quiesce_timeout_s=10, timeout_s=30)
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
            PullRequest([src.endpoint], quiesce=True, quiesce_timeout_s=0.5, timeout_s=30)
        )
    assert snapshot(de) == before


# -- issue 19: a failed single-buffer pull leaves torn weights -----------------------------
def _readyz(p) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{p.ready['metrics_port']}/readyz", timeout=5
        ) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _engine_events(de, n: int = 1) -> tuple[threading.Thread, list]:
    """A subscribed engine that acks `n` pauses and records each resume (version, ok)."""
    events: list = []

    def loop():
        for _ in range(n):
            refit = de.wait_refit(timeout=30)
            refit.ack()
            events.append(refit.wait_done(timeout=30))

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while de.status()["subscribers"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return th, events


def test_failed_single_buffer_pull_resumes_the_engine_with_no_version_and_is_not_ready(cluster):
    """A failed single-buffer pull leaves the engine with torn weights and a ready sidecar:
    now the engine is resumed with "" (no version), the agent says NoVersion, /readyz is
    503 and the error says the slabs hold no version; the next good pull makes it ready."""
    src, dst, se, de, _ = _pair(cluster)
    rpc = cluster.rpc(dst)
    assert _readyz(dst) == 503, "declared, nothing pulled: not ready"
    assert rpc.pull(PullRequest([src.endpoint], timeout_s=30)).version == "v1"
    assert _readyz(dst) == 200
    with se.writing("v2"):
        fill(se, seed=12)
    eng, events = _engine_events(de)
    th, out = _start_pull(rpc, [src.endpoint], version="v2", quiesce=True, timeout_s=30)
    _wait_pulling(rpc)
    time.sleep(0.2)  # part of v2 is in the slabs now
    with se.writing("v3"):  # the pinned version goes away mid-pull: VersionChanged
        fill(se, seed=13)
    th.join(40)
    eng.join(10)
    err = out.get("error")
    assert isinstance(err, VersionChanged), out
    assert "hold no version" in err.message, err.message
    assert events == [("", False)], "the engine must be told its weights hold no version"
    health = rpc.health()
    assert (health.version, health.state) == ("", "NoVersion")
    assert de.status()["state"] == "NoVersion"
    assert _readyz(dst) == 503, "torn weights: not ready"

    eng, events = _engine_events(de)
    reply = rpc.pull(PullRequest([src.endpoint], quiesce=True, timeout_s=30))
    eng.join(10)
    assert reply.version == "v3" and events == [("v3", True)]
    assert rpc.health().state == "Ready" and _readyz(dst) == 200


def test_failed_double_buffer_pull_keeps_the_old_version_served_and_ready(cluster):
    """What `doubleBuffer` buys a serving pod: the same failure leaves the old version
    intact, served and ready (the engine is not even paused: pauses come only at the swap)."""
    src, dst, se, de, want = _pair(cluster)
    rpc = cluster.rpc(dst)
    rpc.pull(PullRequest([src.endpoint], timeout_s=30))
    with se.writing("v2"):
        fill(se, seed=12)
    th, out = _start_pull(
        rpc, [src.endpoint], version="v2", double_buffer=True, quiesce=True, timeout_s=30
    )
    time.sleep(0.5)  # into the standby set (the active one stays Ready): ~1.7 s in all
    with se.writing("v3"):
        fill(se, seed=13)
    th.join(40)
    assert isinstance(out.get("error"), VersionChanged), out
    assert "hold no version" not in out["error"].message
    health = rpc.health()
    assert (health.version, health.state) == ("v1", "Ready")
    assert snapshot(de) == want and _readyz(dst) == 200

"""Engine <-> agent Unix-socket protocol: requests and the pause/ack/resume handshake."""

from __future__ import annotations

import threading
import time

import pytest

from ferry_agent.client import EngineClient
from ferry_agent.control import ControlServer, EngineHandshake
from ferry_agent.errors import EngineNotQuiesced, NotDeclared


@pytest.fixture
def handshake_server(tmp_path):
    handshake = EngineHandshake()

    def handle(op, msg):
        if op == "status":
            return {"subscribers": handshake.subscribers}
        if op == "publish":
            raise NotDeclared("no tensor layout declared on this agent")
        raise ValueError(f"unknown op {op!r}")

    srv = ControlServer(str(tmp_path / "a.sock"), handle, lambda rank: handshake).start()
    yield handshake, srv
    srv.stop()


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_requests_and_typed_errors(handshake_server):
    handshake, srv = handshake_server
    c = EngineClient(srv.path, timeout=5)
    assert c.status() == {"ok": True, "subscribers": 0}
    with pytest.raises(NotDeclared):
        c.publish("v1")
    c.close()


def test_no_engine_subscribed_means_nothing_to_pause(handshake_server):
    handshake, _ = handshake_server
    assert handshake.pause("v1", timeout=0.1) is None


def test_pause_waits_for_ack_then_resume_reaches_engine(handshake_server):
    handshake, srv = handshake_server
    c = EngineClient(srv.path, timeout=5)
    got = {}

    def engine():
        r = c.wait_refit(timeout=5)
        got["pause"] = r.version
        time.sleep(0.1)  # still reading weights: the agent must wait for this ack
        got["acked_at"] = time.monotonic()
        r.ack()
        got["done"] = r.wait_done(timeout=5)

    c.subscribe()
    _wait(lambda: handshake.subscribers == 1)
    th = threading.Thread(target=engine)
    th.start()
    rid = handshake.pause("v9", timeout=5)
    assert time.monotonic() >= got["acked_at"]
    handshake.resume(rid, "v9", ok=True)
    th.join(5)
    assert got["pause"] == "v9" and got["done"] == ("v9", True)
    c.close()
    _wait(lambda: handshake.subscribers == 0)


def test_silent_engine_gives_engine_not_quiesced_and_a_failed_resume(handshake_server):
    handshake, srv = handshake_server
    c = EngineClient(srv.path, timeout=5)
    c.subscribe()
    _wait(lambda: handshake.subscribers == 1)
    with pytest.raises(EngineNotQuiesced) as err:
        handshake.pause("v2", timeout=0.2, holds="v1")
    assert err.value.fields["missing"] == 1
    r = c.wait_refit(timeout=5)  # the event was delivered; acking late is answered "not ok"
    r.ack()
    assert r.wait_done(timeout=5) == ("v1", False)  # what the slabs still hold
    c.close()

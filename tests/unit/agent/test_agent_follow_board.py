"""The source side of continuous refit (follow.FollowerBoard): notices coalesce, waits
end on every follower's report or the deadline, each outcome named."""

from __future__ import annotations

import threading
import time

import pytest

from ferry_agent.errors import BadRequest
from ferry_agent.follow import FollowerBoard, FollowSpec, Notice, Outcome


def test_a_follower_gets_only_the_newest_notice_and_the_current_one_on_subscribe():
    b = FollowerBoard()
    b.notify(Notice("v1", 2))
    sub = b.subscribe("t0", serving="")
    assert sub.next(0.1) == Notice("v1", 2)  # late subscriber: sent what is served now
    b.notify(Notice("v2", 4))
    b.notify(Notice("v3", 6))
    assert sub.next(0.1).version == "v3"  # v2 superseded before it was sent
    assert sub.next(0.05) is None
    assert b.subscribe("t1", serving="v3").next(0.05) is None  # already serves it


def test_wait_returns_each_followers_outcome_or_names_the_missing():
    b = FollowerBoard()
    b.subscribe("t0")
    b.subscribe("t1")
    b.notify(Notice("v1", 2))

    def reports():  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        b.report(Outcome("t0", "v1", "v1", True, bytes=10))
        b.report(Outcome("t1", "v1", "", False, "LayoutMismatch", "x"))

    threading.Thread(target=reports).start()
    out = b.wait("v1", 5.0)
    assert out["t0"].ok and out["t0"].bytes == 10
    assert not out["t1"].ok and out["t1"].reason == "LayoutMismatch"

    b.notify(Notice("v2", 4))
    t0 = time.monotonic()
    out = b.wait("v2", 0.2, at_least=3)
    assert time.monotonic() - t0 >= 0.2
    assert {o.reason for o in out.values()} == {"NotReported", "NotFollowing"}


def test_a_follower_that_leaves_is_not_waited_for_and_the_cap_is_named():
    b = FollowerBoard(max_followers=1)
    sub = b.subscribe("t0")
    with pytest.raises(BadRequest, match="at most 1 followers"):
        b.subscribe("t1")
    sub.close()
    assert b.followers() == {}
    assert b.wait("v1", 0.01) == {}


def test_a_relay_link_cannot_double_buffer():
    with pytest.raises(BadRequest, match="without double buffer"):
        FollowSpec("127.0.0.1:1", upstream="127.0.0.1:2", double_buffer=True)
    req = FollowSpec("127.0.0.1:1", upstream="127.0.0.1:2").request("v1")
    assert req.relay and req.sources == ("127.0.0.1:2",) and req.version == "v1"
    direct = FollowSpec("127.0.0.1:1", upstream="127.0.0.1:2").request("v1", direct=True)
    assert not direct.relay and direct.sources == ("127.0.0.1:1",)

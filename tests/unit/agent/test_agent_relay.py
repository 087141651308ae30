"""Relay ranges: which source bytes a downstream link may read (pure functions)."""

from __future__ import annotations

from ferry_agent.planner import Segment
from ferry_agent.progress import PullTracker, covered, merge


def test_merge_joins_touching_and_overlapping_ranges_per_slab():
    got = merge([(0, 4096, 4096), (1, 0, 10), (0, 0, 4096), (0, 10000, 5), (0, 8000, 2000)])
    assert got == [(0, 0, 10005), (1, 0, 10)]


def test_covered_needs_one_range_holding_the_whole_piece():
    have = merge([(0, 0, 100), (0, 200, 100), (2, 50, 50)])
    assert covered(have, 0, 10, 90) and covered(have, 0, 200, 100) and covered(have, 2, 50, 50)
    assert not covered(have, 0, 90, 20)  # straddles a gap
    assert not covered(have, 1, 0, 1) and not covered(have, 2, 0, 60)
    assert covered(have, 5, 0, 0)  # empty tensors are always there


def test_tracker_records_landed_destination_ranges_and_terminal_state():
    segs = [Segment(0, 0, 0, 1, 4096, 4096), Segment(0, 0, 4096, 1, 8192, 4096)]
    t = PullTracker("v1", 8192, {("peer", 0): segs[:1], ("peer", 1): segs[1:]})

    class E:
        peer = "peer"

    t.on_complete(E(), 1)
    assert t.snapshot().completed == ((1, 8192, 4096),) and t.bytes_done == 4096
    t.on_complete(E(), 0)
    t.finish(ok=True, epoch=6)
    t.finish(ok=False)  # the first outcome stands
    snap = t.snapshot()
    assert snap.completed == ((1, 4096, 8192),) and (snap.state, snap.epoch) == ("Done", 6)


def test_long_poll_wakes_when_bytes_land_or_the_pull_ends_and_times_out_otherwise():
    import threading
    import time

    seg = Segment(0, 0, 0, 0, 0, 1 << 20)
    t = PullTracker("v1", 2 << 20, {})
    t0 = time.monotonic()
    t.wait_beyond(0, 0.05)  # nothing lands: the full wait
    assert time.monotonic() - t0 >= 0.045

    threading.Timer(0.02, t.landed, args=([seg],)).start()
    t0 = time.monotonic()
    t.wait_beyond(0, 5.0)
    assert t.bytes_done == 1 << 20 and time.monotonic() - t0 < 2.0

    t.wait_beyond(0, 5.0)  # already beyond: returns at once
    threading.Timer(0.02, t.finish, args=(True, 4)).start()
    t0 = time.monotonic()
    t.wait_beyond(t.bytes_done, 5.0)  # the pull ends: answered at once
    assert t.state == "Done" and time.monotonic() - t0 < 2.0

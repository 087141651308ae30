"""PullRequest: defaults and bounds in one place, the same on both sides of gRPC; the
stall window a pull may land nothing for."""

from __future__ import annotations

import pytest

from ferry_agent.cycle import PullContext
from ferry_agent.errors import BadRequest
from ferry_agent.proto import ferry_agent_pb2 as pb
from ferry_agent.pull import STALL_FLOOR_BYTES_PER_S, stall_window
from ferry_agent.request import PullRequest


class _Parts:
    chunk_bytes = 64 << 20


def test_stall_timeout_round_trips_and_defaults_when_unset():
    req = PullRequest(("127.0.0.1:1",), stall_timeout_s=3.5)
    assert PullRequest.from_proto(req.to_proto(pb)).stall_timeout_s == 3.5
    unset = pb.PullRequest(sources=["127.0.0.1:1"])
    assert PullRequest.from_proto(unset).stall_timeout_s == PullRequest.stall_timeout_s


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e9])
def test_stall_timeout_out_of_bounds_is_refused_naming_the_field(bad):
    with pytest.raises(BadRequest, match="stall_timeout_s"):
        PullRequest(("127.0.0.1:1",), stall_timeout_s=bad)


def test_stall_window_covers_the_first_read_window_at_the_pace_cap():
    unpaced = PullContext(PullRequest(("h:1",), stall_timeout_s=5), _Parts())
    # 32 chunks of 64 MiB in flight land nothing until they complete.
    assert stall_window(unpaced, 32, 10 << 30) == pytest.approx(
        5 + (32 << 26) / STALL_FLOOR_BYTES_PER_S
    )
    assert stall_window(unpaced, 32, 1 << 20) == pytest.approx(
        5 + (1 << 20) / STALL_FLOOR_BYTES_PER_S
    )
    paced = PullContext(
        PullRequest(("h:1",), stall_timeout_s=5, max_gbps=0.01, chunk_bytes=1 << 20), _Parts()
    )
    assert stall_window(paced, 32, 24 << 20) == pytest.approx(5 + (24 << 20) / 1e7)

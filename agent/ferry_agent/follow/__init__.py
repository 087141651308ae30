"""Continuous refit, agent to agent: targets follow a source's latest version.

The control plane sets up who follows whom once (a RefitJob with `version: follow`;
k8s/following.py turns its assignment into Follow subscriptions); every new version
then travels between agents only:

    1. the trainer publishes version k on the source agent
    2. the source's FollowerBoard (board.py) sends a VersionNotice down each
       follower's Follow stream (a server-streaming call the target opened once: the
       agents' existing gRPC channel, no new connection per step)
    3. each target's Follower (follower.py) runs the usual receiver-driven pull
       (cycle.py) of k: from the source, or as a relay link from its upstream target
       (chain / tree)
    4. the target Reports to the source which version it now serves (records.py)
    5. `publish_and_wait` (engine client) returns once every follower reported k, or
       its deadline passed, with each follower's outcome

Notices coalesce: a follower that falls behind pulls only the newest version. Nothing
here talks to the apiserver; CR status is folded from the followers' rate-limited
Lease reports, off this path.
"""

from .board import MAX_FOLLOWERS, STREAM_IDLE_S, FollowerBoard, Subscription, stream
from .follower import (
    RECONNECT_MAX_S,
    RECONNECT_S,
    VERSION_RETRIES,
    Follower,
    FollowSpec,
    FollowState,
    follower_name,
    with_name,
)
from .records import Notice, Outcome, missing

__all__ = [
    "MAX_FOLLOWERS",
    "RECONNECT_MAX_S",
    "RECONNECT_S",
    "STREAM_IDLE_S",
    "VERSION_RETRIES",
    "FollowSpec",
    "FollowState",
    "Follower",
    "FollowerBoard",
    "Notice",
    "Outcome",
    "Subscription",
    "follower_name",
    "missing",
    "stream",
    "with_name",
]

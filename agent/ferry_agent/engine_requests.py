"""The agent's answers to its engine's requests on the control socket (see control.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .follow import Follower, FollowSpec, follower_name
from .layout import TensorSpec

if TYPE_CHECKING:
    from .agent import Agent
    from .rank import RankAgent


def layout_reply(agent: RankAgent) -> dict[str, Any]:
    layout = agent.layout
    info = agent.version_info()
    return {
        "rank": agent.rank,
        "memory": agent.config.memory,
        "fingerprint": layout.fingerprint,
        "generation": info["generation"],
        "version": info["version"],
        "epoch": info["epoch"],
        "alignment": layout.alignment,
        "slabs": [
            {
                "index": s.index,
                "handle": s.handle,
                "nbytes": s.nbytes,
                "device_id": s.device_id,
                "memory": s.memory,
            }
            for s in (slab.info for slab in agent.slabs)
        ],
        "tensors": [p.to_dict() for p in layout.placements],
    }


def handle_request(pod: Agent, op: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Answer one request of the engine worker of local rank msg["rank"] (0 if absent)."""
    agent = pod.rank(int(msg.get("rank", 0)))
    if op == "hello":
        return {
            "agent": agent.name,
            "pod": pod.config.pod,
            "namespace": pod.config.namespace,
            "memory": pod.config.memory,
            "rank": agent.rank,
            "ranks": len(pod.ranks),
            "state": agent.state,
            **agent.version_info(),
        }
    if op == "declare":
        specs = [TensorSpec.from_dict(t) for t in msg["tensors"]]
        created = agent.declare(specs)
        done = agent.store.last_declare
        register_s = done.register_s if created and done is not None else 0.0
        return {"created": created, "register_s": register_s, **layout_reply(agent)}
    if op == "layout":
        return layout_reply(agent)
    if op == "begin_write":
        return {"epoch": agent.begin_write()}
    if op == "publish":
        version = str(msg["version"])
        reply: dict[str, Any] = {"epoch": agent.publish(version), "version": version}
        if msg.get("wait_s") is not None:  # publish_and_wait: until the followers serve it
            outcomes = agent.followers.wait(
                version,
                float(msg["wait_s"]),
                followers=tuple(str(f) for f in msg.get("followers") or ()),
                at_least=int(msg.get("at_least") or 0),
            )
            reply["targets"] = {f: o.to_dict() for f, o in outcomes.items()}
        return reply
    if op == "followers":
        return {
            "version": agent.version_info()["version"],
            "followers": {
                f: o.to_dict() if o else None for f, o in agent.followers.followers().items()
            },
        }
    if op == "follow":
        spec = FollowSpec.from_dict({**msg["spec"], "rank": agent.rank})
        f = pod.follow(spec)
        return {"name": f.name}
    if op == "unfollow":
        name = str(msg.get("name") or follower_name(pod.config.pod, agent.rank))
        return {"stopped": pod.unfollow(name)}
    if op == "following":
        return {
            "follows": {
                n: _follow_state(f) for n, f in pod.follows.items() if f.spec.rank == agent.rank
            }
        }
    if op == "pull":
        from .request import PullRequest

        r = pod.pull(PullRequest.from_dict({**msg.get("request", {}), "rank": agent.rank}))
        return {
            "version": r.version,
            "bytes": r.bytes,
            "seconds": r.seconds,
            "attempts": r.attempts,
            "transport": str(r.details.get("transport", "nixl")),
            "verified_pieces": int(r.details.get("verified_pieces", 0)),
        }
    if op == "status":
        return {
            "rank": agent.rank,
            "state": agent.state,
            "endpoint": pod.endpoint,
            "subscribers": agent.handshake.subscribers,
            **agent.version_info(),
            "stats": agent.transport.stats.as_dict(),
        }
    raise ValueError(f"unknown op {op!r}")


def _follow_state(f: Follower) -> dict[str, Any]:
    st = f.state
    return {
        "source": f.spec.source,
        "upstream": f.spec.upstream,
        "serving": st.serving,
        "pulls": st.pulls,
        "failures": st.failures,
        "connected": st.connected,
        "history": list(st.history),
        "last": st.last.to_dict() if st.last else None,
    }

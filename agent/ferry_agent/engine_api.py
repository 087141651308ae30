"""Agent-side handlers for the engine's Unix-socket requests (see control.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .layout import TensorSpec

if TYPE_CHECKING:
    from .agent import Agent


def layout_reply(agent: Agent) -> dict[str, Any]:
    layout = agent.layout
    info = agent.version_info()
    return {
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


def handle_control(agent: Agent, op: str, msg: dict[str, Any]) -> dict[str, Any]:
    if op == "hello":
        return {
            "agent": agent.name,
            "pod": agent.config.pod,
            "namespace": agent.config.namespace,
            "memory": agent.config.memory,
            "state": agent.state,
            **agent.version_info(),
        }
    if op == "declare":
        specs = [TensorSpec.from_dict(t) for t in msg["tensors"]]
        created = agent.declare(specs)
        return {"created": created, "register_s": agent.register_s, **layout_reply(agent)}
    if op == "layout":
        return layout_reply(agent)
    if op == "begin_write":
        return {"epoch": agent.begin_write()}
    if op == "publish":
        return {"epoch": agent.publish(str(msg["version"])), "version": str(msg["version"])}
    if op == "status":
        return {
            "state": agent.state,
            "endpoint": agent.endpoint,
            "subscribers": agent.link.subscribers,
            **agent.version_info(),
            "stats": agent.engine.stats.as_dict(),
        }
    raise ValueError(f"unknown op {op!r}")

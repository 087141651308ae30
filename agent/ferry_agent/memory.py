"""How a slab of weight memory is described to NIXL, to peers and to the engine."""

from __future__ import annotations

from dataclasses import dataclass


def nixl_memory(memory: str) -> str:
    """NIXL's memory kind for an agent's `memory` setting (host | cuda)."""
    return "VRAM" if memory == "cuda" else "DRAM"


@dataclass(frozen=True)
class SlabInfo:
    """What a peer or the engine needs to know about a slab (typed, no pickles)."""

    index: int
    addr: int
    nbytes: int
    memory: str  # "DRAM" | "VRAM"
    device_id: int  # NIXL device id: 0 for DRAM, the CUDA ordinal for VRAM
    handle: str  # shm name (host) or hex CUDA IPC handle (cuda)

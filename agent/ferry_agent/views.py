"""Tensors that are views into slabs (torch), for the engine side and in-process use."""

from __future__ import annotations

from typing import Any

from .layout import Placement


def torch_dtype(name: str) -> Any:
    import torch

    dt = getattr(torch, name, None)
    if dt is None or not isinstance(dt, torch.dtype):
        raise ValueError(f"torch has no dtype {name!r}")
    return dt


def tensor_view(slab: Any, p: Placement) -> Any:
    """A torch tensor of p.dtype/p.shape aliasing slab bytes [offset, offset+nbytes)."""
    import torch

    if getattr(slab, "memory", "DRAM") == "VRAM":
        raw = slab.tensor()[p.offset : p.offset + p.nbytes]
    else:
        raw = torch.from_numpy(slab.view(p.offset, p.nbytes))
    return raw.view(torch_dtype(p.dtype)).view(p.shape)


def tensor_views(
    slabs: list[Any], placements: tuple[Placement, ...] | list[Placement]
) -> dict[str, Any]:
    return {p.name: tensor_view(slabs[p.slab], p) for p in placements}

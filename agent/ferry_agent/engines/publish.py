"""Trainer side: publish a module's (or a state dict's) weights as versions.

    pub = ModulePublisher(EngineClient.connect(), model, dtype=torch.bfloat16)
    for step in ...:
        optimizer.step()
        pub.publish(f"step-{step}")

The layout is declared once, when the publisher is made (ties once, the cast, the
name map and the filter applied: see `layout.py`). Each `publish` is copies into
the slab views (cast included) and the agent's publish; never a re-declare. A
module whose tensors no longer match the declared layout is refused with the
planner's LayoutMismatch wording, before anything is written.

FSDP2 / DTensor parameters are gathered one tensor at a time (`full_tensor()`,
an all-gather every rank of the mesh joins), copied into the slabs of the ranks
that publish, and dropped: the extra memory is one full tensor (the largest
one bounds it), whatever the model's size. Every rank constructs a publisher
and calls `publish` in the same order (the all-gathers are collectives); ranks
that do not publish pass `client=None`. Why gather rather than let each rank
publish its shard as a tensor-parallel source: FSDP's shards are even dim-0
chunks of every tensor over the training world size (padding included), a
layout no serving engine uses; inference TP shards column- and row-parallel
weights along different dims over a different, smaller degree. Gathered, the
slabs hold the checkpoint-format tensors both bind (HF names and shapes) and
copy-in engines (`load_weights`, which does its own TP slicing) take, and the
targets' TP reshard works from them. The all-gathers run on the training
fabric; one publishing rank per node (each with its own agent) gives the
RefitJob several sources to stripe over.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LayoutMismatch
from ..layout import Placement
from ..planner import pair
from .layout import Include, ModuleLayout, Rename, module_layout, named_tensors


@dataclass(frozen=True)
class PublishResult:
    version: str
    tensors: int
    bytes: int
    copy_s: float  # gathers (DTensor) and copies into the slabs, device sync included
    total_s: float  # begin_write .. publish acknowledged by the agent
    epoch: int = 0  # the agent's epoch after publish (0 on ranks that do not publish)


def _placements(layout: ModuleLayout) -> list[Placement]:
    """The planner's records for a layout (only names, dtypes and shapes matter to pair)."""
    return [Placement(e.name, e.dtype, e.shape, 0, 0, e.spec.nbytes) for e in layout.entries]


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _sync(devices: Iterable[Any]) -> None:
    """Copies into CUDA slabs are asynchronous: peers READ the slabs right after publish."""
    import torch

    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


class ModulePublisher:
    """Declares `source`'s layout on the agent once; `publish(version)` ships its weights."""

    def __init__(
        self,
        client: Any,
        source: Any,
        *,
        dtype: Any = None,
        rename: Rename | None = None,
        include: Include | None = None,
    ):
        self.client = client
        self.source = source
        self.layout = module_layout(source, cast=dtype, rename=rename, include=include)
        self._cast, self._rename, self._include = dtype, rename, include
        self.views: dict[str, Any] = {}
        if client is not None:
            self.views = client.declare(self.layout.specs)

    def check(self, tensors: Mapping[str, Any]) -> None:
        """Raise LayoutMismatch (planner wording) when `tensors` no longer give the
        declared layout: names, dtypes, shapes, ties."""
        now = module_layout(tensors, cast=self._cast, rename=self._rename, include=self._include)
        if now != self.layout:
            pair(
                _placements(self.layout),
                _placements(now),
                source_name="the declared layout",
                target_name="the module now",
            )
            raise LayoutMismatch(
                "the module's tensors no longer match the declared layout: ties or source "
                "names changed (same served names, dtypes and shapes)",
                differences=[],
                count=0,
            )

    def publish(self, version: str, source: Any = None) -> PublishResult:
        """Copy the current weights (of `source`, default the one given at construction)
        into the slabs and publish them as `version`. Peers never see a half-written
        set: the agent's epoch stays odd from begin_write until publish."""
        import torch

        tensors = named_tensors(self.source if source is None else source)
        self.check(tensors)
        t0 = time.perf_counter()
        if self.client is not None:
            self.client.begin_write()
        devices: set[Any] = set()
        with torch.no_grad():
            for e in self.layout.entries:
                t = tensors[e.source]
                if _is_dtensor(t):
                    t = t.full_tensor()  # collective: every rank gathers, in layout order
                view = self.views.get(e.name)
                if view is not None:
                    view.copy_(t)
                    devices.update((view.device, t.device))
                del t
            _sync(devices)
        copied = time.perf_counter()
        epoch = self.client.publish(version) if self.client is not None else 0
        return PublishResult(
            version,
            len(self.layout.entries),
            self.layout.nbytes,
            copied - t0,
            time.perf_counter() - t0,
            epoch,
        )


__all__ = ["ModulePublisher", "PublishResult"]

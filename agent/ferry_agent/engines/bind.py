"""Target side: a torch module whose weights are views into the agent's slabs (zero copy).

    bound = BoundModule(EngineClient.connect(), model)
    bound.bind()            # parameters and persistent buffers now alias the slabs

Binding re-points every parameter and persistent buffer (`t.data = view`: the
module keeps its own Parameter objects, so modules that share one, such as tied
embeddings, stay tied) at the view of the same name. Nothing is copied and
nothing is allocated: the module's previous storage is freed once unreferenced.
A refit writes into the same slabs, so the addresses do not change and CUDA
graphs captured after the bind stay valid. Only a double-buffer swap (or a
re-declared layout) moves the weights to other slabs: `rebind()` re-points them
and says so (`BindResult.moved`); graphs captured before must be captured again.

A module whose names, dtypes or shapes differ from the agent's layout, or whose
tensors live on another device than the slabs, is refused before any tensor is
touched (LayoutMismatch names the first differences, in the planner's words).
Tensors on the meta device are replaced by new Parameters over the views (every
slot that held the old object gets the new one, so ties hold there too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FerryError
from ..layout import Placement
from ..planner import pair
from .layout import ModuleLayout, module_layout, named_tensors

AGENT = "the agent's slabs"
MODULE = "the module"


class DeviceMismatch(FerryError):
    """The module's tensors live on another device than the agent's slabs."""

    reason = "DeviceMismatch"


@dataclass(frozen=True)
class BindResult:
    tensors: int  # layout entries bound (ties count once)
    bytes: int
    generation: int  # the agent's slab generation the views belong to
    # the weights now live in another slab set than at the previous bind (a double-buffer
    # swap or a re-declared layout; first bind: False). Decided by the slab generation,
    # not by comparing addresses: CUDA IPC may map the new set at the virtual addresses
    # the old mapping just released (seen on an H200), with other memory behind them.
    moved: bool


def _module_placements(layout: ModuleLayout) -> list[Placement]:
    return [Placement(e.name, e.dtype, e.shape, 0, 0, e.spec.nbytes) for e in layout.entries]


def check_bindable(
    layout: ModuleLayout, placements: Sequence[Placement], tensors: Mapping[str, Any], device: Any
) -> None:
    """Raise LayoutMismatch or DeviceMismatch; touches nothing."""
    pair(list(placements), _module_placements(layout), source_name=AGENT, target_name=MODULE)
    for e in layout.entries:
        t = tensors[e.source]
        if t.device.type != "meta" and t.device != device:
            raise DeviceMismatch(
                f"{e.source} is on {t.device}, the agent's slabs on {device}: build or move "
                f"the module to {device} (or to the meta device) before binding",
                tensor=e.source,
                module_device=str(t.device),
                slab_device=str(device),
            )


def _repoint(
    module: Any, tensors: Mapping[str, Any], layout: ModuleLayout, views: Mapping[str, Any]
) -> None:
    import torch

    swap: dict[int, Any] = {}
    for e in layout.entries:
        view = views[e.name]
        for name in (e.source, *e.aliases):
            old = tensors[name]
            if id(old) in swap:
                continue
            if torch._has_compatible_shallow_copy_type(old, view):
                old.data = view
            elif isinstance(old, torch.nn.Parameter):
                swap[id(old)] = torch.nn.Parameter(view, requires_grad=old.requires_grad)
            else:
                swap[id(old)] = view
    if not swap:
        return
    for sub in module.modules():
        for slots in (sub._parameters, sub._buffers):
            for key, val in slots.items():
                if val is not None and id(val) in swap:
                    slots[key] = swap[id(val)]


def bind_views(
    module: Any, views: Mapping[str, Any], placements: Sequence[Placement]
) -> ModuleLayout:
    """Re-point `module` at `views` (checked first: nothing is touched on refusal)."""
    tensors = named_tensors(module)
    layout = module_layout(tensors)
    device = next(iter(views.values())).device if views else None
    check_bindable(layout, placements, tensors, device)
    _repoint(module, tensors, layout, views)
    return layout


class BoundModule:
    """A module bound to the views of an EngineClient (see the module docstring)."""

    def __init__(self, client: Any, module: Any):
        self.client = client
        self.module = module
        self.layout: ModuleLayout | None = None
        self.generation = -1

    @property
    def bound(self) -> bool:
        return self.layout is not None

    @property
    def device(self) -> Any:
        views = self.client.tensors
        return next(iter(views.values())).device if views else None

    def addresses(self) -> dict[str, int]:
        """data_ptr of every bound tensor, by name (a test of address stability)."""
        tensors = named_tensors(self.module)
        return {name: int(t.data_ptr()) for name, t in tensors.items()}

    def bind(self) -> BindResult:
        """Map the agent's current slabs and re-point the module at them."""
        before = self.generation if self.bound else -1
        views = self.client.attach()
        self.layout = bind_views(self.module, views, self.client.placements)
        self.generation = self.client.generation
        return BindResult(
            len(self.layout.entries),
            self.layout.nbytes,
            self.generation,
            before != -1 and before != self.generation,
        )

    def rebind(self) -> BindResult | None:
        """After a refit: re-point when the agent's slabs changed (double-buffer swap or a
        re-declared layout); None when the weights stayed where they were."""
        if not self.bound:
            return self.bind()
        if int(self.client.status()["generation"]) == self.generation:
            return None
        return self.bind()


__all__ = ["BindResult", "BoundModule", "DeviceMismatch", "bind_views", "check_bindable"]

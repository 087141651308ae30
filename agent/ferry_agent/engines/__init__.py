"""Put Ferry's slabs into real models: the torch layer engines and trainers share.

Engine-agnostic; each piece works on a plain `torch.nn.Module` or state dict:

- `ModulePublisher` (publish.py): a trainer declares its module's layout once and
  publishes a version per step (copies into the slabs, optional cast, name map,
  filter; FSDP2/DTensor gathered tensor by tensor).
- `BoundModule` (bind.py): an engine's module whose parameters and persistent
  buffers are views into the slabs (zero copy, ties kept, addresses stable).
- `RefitHandler` (refit.py): the pause/ack/resume handshake in a background
  thread, a lock the serving loop holds while it reads weights, and
  `pause()` / `resume(version, ok)` callbacks.
- `layout.py`: which tensors, under which names and dtypes (shared by both sides).
- `hf.py`: HF transformers helpers (tiny models from a config, greedy outputs).
- `sglang.py`: SGLang's loader plugin and refits through its weight-update session
  (imports SGLang only when SGLang calls it; docs/sglang.md).

Copy-in engines (vLLM, SGLang) reuse `RefitHandler` without a module and load
the slab views with their own `load_weights`; their trainer-side senders build
on `ModulePublisher`.
"""

from .bind import BindResult, BoundModule, DeviceMismatch
from .layout import Entry, ModuleLayout, SharedStorageError, module_layout
from .publish import ModulePublisher, PublishResult
from .refit import RefitHandler, WeightsLock, WeightsState

__all__ = [
    "BindResult",
    "BoundModule",
    "DeviceMismatch",
    "Entry",
    "ModuleLayout",
    "ModulePublisher",
    "PublishResult",
    "RefitHandler",
    "SharedStorageError",
    "WeightsLock",
    "WeightsState",
    "module_layout",
]

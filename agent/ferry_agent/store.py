"""The agent's weight memory: slab sets registered with NIXL once, their layout and
generation.

A slab set is a few large buffers (layout.py places the tensors), allocated and
registered together and released together: a registered buffer is never freed while
registered. The active set is what the engine maps and peers read; with double
buffering a standby set of the same layout takes the READs and is swapped in. The
generation counts every change of the active set's memory (declare, swap); peers key
their cached manifests and prepared descriptor lists by it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .bounds import check_slab_bytes
from .errors import NotDeclared
from .layout import Layout, TensorSpec, plan_layout
from .memory import SlabInfo, nixl_memory
from .slabs import create_slabs

if TYPE_CHECKING:
    from .transport import NixlTransport

log = logging.getLogger(__name__)


@dataclass
class SlabSet:
    """Slabs and the NIXL registration that covers exactly them."""

    slabs: list[Any]
    registration: Any
    alloc_s: float
    register_s: float

    @property
    def infos(self) -> list[SlabInfo]:
        return [s.info for s in self.slabs]

    def release(self, transport: NixlTransport) -> None:
        if self.registration is not None:
            transport.deregister(self.registration, len(self.slabs))
            self.registration = None
        for s in self.slabs:
            s.close()
        self.slabs = []


class SlabStore:
    def __init__(
        self,
        transport: NixlTransport,
        *,
        memory: str,
        device: int,
        prefix: str,
        slab_bytes: int,
        scratch_prefix: str = "",
        lock: threading.RLock,
        max_bytes: int = 0,
    ):
        """`max_bytes`: the most slab bytes this store holds at once (0: no limit;
        bounds.py): a layout past it is refused before anything is allocated."""
        self.transport = transport
        self.memory, self.device, self.prefix, self.slab_bytes = memory, device, prefix, slab_bytes
        self.scratch_prefix = scratch_prefix or prefix  # host slabs' names (slabs.slab_prefix)
        self.nixl_memory = nixl_memory(memory)
        self.lock = lock  # the agent's state lock (shared with its VersionState)
        self.max_bytes = max_bytes
        self._layout: Layout | None = None
        self._active: SlabSet | None = None
        self._standby: SlabSet | None = None
        self._generation = 0

    # -- what the agent holds -----------------------------------------------------
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise NotDeclared("no tensor layout declared on this agent")
        return self._layout

    @property
    def declared(self) -> bool:
        return self._layout is not None

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def slabs(self) -> list[Any]:
        """The active set (a copy of the list: a swap replaces it)."""
        return list(self._active.slabs) if self._active else []

    @property
    def last_declare(self) -> SlabSet | None:
        """The active set, with how long its allocation and registration took."""
        return self._active

    def views(self) -> dict[str, Any]:
        from .views import tensor_views

        return tensor_views(self.slabs, self.layout.placements)

    # -- changing it ------------------------------------------------------------------
    def allocate(self, sizes: Sequence[int], prefix: str | None = None) -> SlabSet:
        """A new registered slab set of these sizes (the caller owns it: release())."""
        t0 = time.perf_counter()
        slabs = create_slabs(
            tuple(sizes), self.memory, prefix=prefix or self.prefix, device=self.device
        )
        t1 = time.perf_counter()
        try:
            reg = self.transport.register(
                [(s.addr, s.nbytes, s.device_id) for s in slabs], self.nixl_memory
            )
        except BaseException:
            for s in slabs:
                s.close()
            raise
        return SlabSet(slabs, reg, t1 - t0, time.perf_counter() - t1)

    def declare(self, specs: Sequence[TensorSpec]) -> bool:
        """Allocate and register slabs for `specs` (a new generation). False when the same
        layout is already in place: nothing re-allocated or re-registered."""
        layout = plan_layout(list(specs), self.slab_bytes)
        with self.lock:
            if self._layout is not None and self._layout.fingerprint == layout.fingerprint:
                return False
            check_slab_bytes(sum(layout.slab_sizes), 0, self.max_bytes)  # LayoutTooLarge
            self._release_all()
            self._active = self.allocate(layout.slab_sizes)
            self._layout = layout
            self._generation += 1
            return True

    def standby(self) -> list[Any]:
        """The second slab set of the same layout (allocated and registered on first use,
        then kept)."""
        with self.lock:
            if self._standby is None:
                sizes = self.layout.slab_sizes
                check_slab_bytes(sum(sizes), sum(sizes), self.max_bytes)  # LayoutTooLarge
                self._standby = self.allocate(sizes)
                log.info(
                    "standby slab set allocated in %.1f ms, registered in %.1f ms",
                    self._standby.alloc_s * 1e3,
                    self._standby.register_s * 1e3,
                )
            return list(self._standby.slabs)

    def swap(self) -> None:
        """Make the standby set the active one (it holds the new weights): a new generation."""
        with self.lock:
            if self._standby is None:
                raise NotDeclared("no standby slab set to swap in")
            self._active, self._standby = self._standby, self._active
            self._generation += 1

    def _release_all(self) -> None:
        for s in (self._active, self._standby):
            if s is not None:
                s.release(self.transport)
        self._active = self._standby = None

    def close(self) -> None:
        with self.lock:
            self._release_all()

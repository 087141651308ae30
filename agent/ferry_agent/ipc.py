"""Same-GPU pulls: copy from a source's slabs through CUDA IPC instead of NIXL.

Two agents on one GPU (a colocated trainer and engine, the common RL layout) get no
fast path from NIXL: UCX picks tcp/lo between two processes on one device (8 GB at
0.54 GB/s against a 2,107 GB/s device-to-device copy, on one H200: NIXL-NOTES), and
it will not start without TCP for wire-up. So a target whose source is on the same
GPU — the same host (boot id) and the same PCI bus id — opens the source's slabs with
their CUDA IPC handles (from the manifest) and copies the plan's segments with
cudaMemcpyAsync on its own stream. Everything else (plan, fence, publish) is the
ordinary cycle's: the source's version header is still READ before and after.

If opening the handles fails (another container without a shared IPC namespace, a
driver refusing peer mappings) the pull goes over NIXL and a warning says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import TransferTimeout
from .memory import SlabInfo
from .planner import Segment, joined
from .transport import ReadResult

if TYPE_CHECKING:
    from .manifest import Manifest

log = logging.getLogger(__name__)
TRANSPORT = "cuda-ipc"
# Bytes queued between two progress marks: progress and cancellation are looked at as
# each batch finishes (1 GiB takes ~0.5 ms on an H200). Contiguous plan segments are
# merged into one copy first: the plan's chunks exist to keep several NIXL READs in
# flight, and eight 1 GiB copies instead of one ran an 8 GB cycle at 0.86x of a torch
# device-to-device copy (docs/bench/transfer-cuda-samegpu-ipc-20261202-h200.json).
BATCH_BYTES = 1 << 30


def host_id() -> str:
    """This machine's boot id: equal for every container on one kernel, else different."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Locality:
    """Where an agent's slabs are: host boot id and GPU PCI bus id ("" for host memory)."""

    host: str
    device: str

    def same_gpu(self, manifest: Manifest) -> bool:
        return bool(self.device) and (manifest.host_id, manifest.device) == (self.host, self.device)


def locality(memory: str, device: int) -> Locality:
    if memory != "cuda":
        return Locality(host_id(), "")
    from .cuda import pci_bus_id

    return Locality(host_id(), pci_bus_id(device))


class CudaIpcCopier:
    """Opened peer slabs (kept while the peer's manifest cache key is unchanged) and one
    copy stream on our device."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._stream: Any = None
        self._opened: dict[str, tuple[str, dict[int, Any]]] = {}  # endpoint -> (key, slabs)
        self._refused: dict[str, str] = {}  # endpoint -> cache key it failed for

    def open(self, endpoint: str, manifest: Manifest) -> bool:
        """Map the peer's slabs; False (and a warning, once per layout) when they cannot be."""
        key = manifest.cache_key
        cached = self._opened.get(endpoint)
        if cached is not None and cached[0] == key:
            return True
        if self._refused.get(endpoint) == key:
            return False
        self.forget(endpoint)
        from .cuda import CudaSlab

        slabs: dict[int, Any] = {}
        try:
            for s in manifest.slabs:
                slabs[s.index] = CudaSlab.attach(s.index, s.handle, s.nbytes, self.device)
        except Exception as exc:
            for sl in slabs.values():
                sl.close()
            self._refused[endpoint] = key
            log.warning(
                "source %s is on this GPU but its slabs cannot be opened through CUDA IPC (%s): "
                "pulling over NIXL instead, which UCX runs over TCP on one GPU (~0.5 GB/s); "
                "share the IPC namespace between the two containers (same pod, or hostIPC)",
                endpoint,
                exc,
            )
            return False
        self._opened[endpoint] = (key, slabs)
        return True

    def copy(
        self,
        work: Sequence[tuple[str, Sequence[Segment]]],
        local: Sequence[SlabInfo],
        *,
        deadline: float,
        check: Callable[[], None],
        on_landed: Callable[[Sequence[Segment]], None],
    ) -> ReadResult:
        """Copy each peer's segments into our `local` slabs; `check` runs between batches
        (it may raise: the copies queued so far finish, nothing more is queued).
        `on_landed` gets the (merged) segments of each batch as it finishes."""
        from .cuda import CopyStream

        if self._stream is None:
            self._stream = CopyStream(self.device)
        stream = self._stream
        dst = {s.index: s for s in local}
        t0 = time.perf_counter()
        per_peer: dict[str, int] = {}
        pending: list[tuple[Any, list[Segment]]] = []
        batch: list[Segment] = []
        queued = descriptors = 0

        def land_first(block: bool) -> bool:
            """Report the oldest batch once it finished (waiting for it if `block`)."""
            if not pending or not (block or stream.done(pending[0][0])):
                return False
            ev, segs = pending.pop(0)
            if block:
                stream.wait(ev)
            stream.release(ev)
            on_landed(segs)
            return True

        try:
            for endpoint, segs in work:
                _, slabs = self._opened[endpoint]
                for g in joined(segs):
                    stream.copy(
                        dst[g.dst_slab].addr + g.dst_offset,
                        slabs[g.src_slab].addr + g.src_offset,
                        g.nbytes,
                    )
                    batch.append(g)
                    queued += g.nbytes
                    descriptors += 1
                    per_peer[endpoint] = per_peer.get(endpoint, 0) + g.nbytes
                    if sum(b.nbytes for b in batch) >= BATCH_BYTES:
                        pending.append((stream.mark(), batch))
                        batch = []
                        while land_first(block=False):
                            pass
                        check()
            if batch:
                pending.append((stream.mark(), batch))
            # Everything is queued: wait for each batch in turn (woken when it finishes,
            # where polling added up to its period to every cycle), looking at cancel and
            # the deadline between batches. Queued copies cannot be recalled: a cancel
            # lands once they finished (milliseconds: 8 GB copy in ~4 ms on an H200).
            while land_first(block=True):
                if pending:
                    check()
                if time.monotonic() > deadline:
                    raise TransferTimeout("same-GPU copy not finished at the deadline")
        finally:
            while land_first(block=True):  # never return while a copy into our slabs runs
                pass
        return ReadResult(queued, time.perf_counter() - t0, descriptors, descriptors, per_peer)

    def forget(self, endpoint: str) -> None:
        cached = self._opened.pop(endpoint, None)
        if cached is not None:
            for sl in cached[1].values():
                sl.close()

    def close(self) -> None:
        for endpoint in list(self._opened):
            self.forget(endpoint)
        if self._stream is not None:
            self._stream.close()
            self._stream = None

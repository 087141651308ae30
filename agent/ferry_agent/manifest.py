"""The manifest a source serves to its peers, and its typed protobuf form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ManifestRejected
from .layout import ALIGNMENT, DTYPE_SIZES, Placement, fingerprint
from .memory import SlabInfo
from .proto import ferry_agent_pb2 as _pb

# Generated modules have no type stubs.
pb: Any = _pb


@dataclass(frozen=True)
class Manifest:
    agent: str
    pod: str
    namespace: str
    version: str
    epoch: int
    fingerprint: str
    generation: int
    memory: str
    tensors: tuple[Placement, ...]
    slabs: tuple[SlabInfo, ...]
    nixl_metadata: bytes = field(default=b"", repr=False)
    alignment: int = ALIGNMENT
    host_id: str = ""  # the host's boot id
    device: str = ""  # the GPU's PCI bus id (cuda)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def cache_key(self) -> str:
        """Changes whenever the peer's NIXL identity or its registered memory changes."""
        return f"{self.agent}#{self.generation}#{self.fingerprint}"

    def to_proto(self, *, with_metadata: bool = True) -> Any:
        return pb.Manifest(
            agent=self.agent,
            pod=self.pod,
            namespace=self.namespace,
            version=self.version,
            epoch=self.epoch,
            fingerprint=self.fingerprint,
            generation=self.generation,
            memory=self.memory,
            alignment=self.alignment,
            tensors=[
                pb.TensorEntry(
                    name=t.name,
                    dtype=t.dtype,
                    shape=list(t.shape),
                    slab=t.slab,
                    offset=t.offset,
                    nbytes=t.nbytes,
                )
                for t in self.tensors
            ],
            slabs=[
                pb.SlabEntry(
                    index=s.index,
                    addr=s.addr,
                    nbytes=s.nbytes,
                    memory=s.memory,
                    device_id=s.device_id,
                    ipc_handle=s.handle if s.memory == "VRAM" else "",
                )
                for s in self.slabs
            ],
            nixl_metadata=self.nixl_metadata if with_metadata else b"",
            host_id=self.host_id,
            device=self.device,
        )

    @classmethod
    def from_proto(cls, m: Any) -> Manifest:
        slabs = tuple(
            SlabInfo(
                int(s.index),
                int(s.addr),
                int(s.nbytes),
                str(s.memory),
                int(s.device_id),
                str(s.ipc_handle) if s.memory == "VRAM" else "",
            )
            for s in m.slabs
        )
        tensors = tuple(
            Placement(
                t.name,
                t.dtype,
                tuple(int(d) for d in t.shape),
                int(t.slab),
                int(t.offset),
                int(t.nbytes),
            )
            for t in m.tensors
        )
        man = cls(
            agent=m.agent,
            pod=m.pod,
            namespace=m.namespace,
            version=m.version,
            epoch=int(m.epoch),
            fingerprint=m.fingerprint,
            generation=int(m.generation),
            memory=m.memory,
            tensors=tensors,
            slabs=slabs,
            nixl_metadata=bytes(m.nixl_metadata),
            alignment=int(m.alignment) or ALIGNMENT,
            host_id=str(m.host_id),
            device=str(m.device),
        )
        man.validate()
        return man

    def validate(self) -> None:
        """Refuse a malformed manifest with ManifestRejected. A peer is not trusted to
        hand us descriptors: every tensor must lie inside a slab it declared, with the
        bytes its dtype and shape say (planners size READs from shapes), under a unique
        name, without overlapping another; slabs must fit the 64-bit address space; the
        fingerprint must be the one of its tensor list."""
        by_index = {s.index: s for s in self.slabs}
        if len(by_index) != len(self.slabs):
            self._reject("duplicate slab indexes")
        if self.memory not in ("host", "cuda"):
            self._reject(f"memory {self.memory!r} is neither host nor cuda")
        if self.alignment <= 0 or self.alignment & (self.alignment - 1) or self.alignment > 1 << 30:
            self._reject(f"alignment {self.alignment} is not a power of two up to 1 GiB")
        for s in self.slabs:
            if s.memory not in ("DRAM", "VRAM") or s.memory != self.slabs[0].memory:
                self._reject(f"slab {s.index} memory {s.memory!r}")
            if s.addr + s.nbytes > 1 << 64:
                self._reject(f"slab {s.index} at {s.addr:#x} + {s.nbytes} passes the end of memory")
            if s.handle and not _is_ipc_handle(s.handle):
                self._reject(f"slab {s.index}: CUDA IPC handle is not {IPC_HANDLE_BYTES} hex bytes")
        seen: set[str] = set()
        for t in self.tensors:
            if not t.name or t.name in seen:
                self._reject(f"tensor name {t.name!r} empty or repeated")
            seen.add(t.name)
            if t.dtype not in DTYPE_SIZES or any(d < 0 for d in t.shape):
                self._reject(f"tensor {t.name}: dtype {t.dtype!r}, shape {list(t.shape)}")
            if t.nbytes != math.prod(t.shape) * DTYPE_SIZES[t.dtype]:
                self._reject(f"tensor {t.name}: {t.nbytes} bytes for {t.dtype} {list(t.shape)}")
            slab = by_index.get(t.slab)
            if slab is None or t.offset + t.nbytes > slab.nbytes:
                self._reject(f"tensor {t.name} outside its slab")
        have = fingerprint(t.spec for t in self.tensors)
        if self.fingerprint != have:  # peers compare (and a fresh target adopts) the claim
            self._reject(
                f"fingerprint {self.fingerprint} is not its tensors' ({have}, from their "
                "names, dtypes and shapes)"
            )
        end: dict[int, tuple[int, str]] = {}
        for t in sorted((t for t in self.tensors if t.nbytes), key=lambda t: (t.slab, t.offset)):
            prev = end.get(t.slab)
            if prev is not None and t.offset < prev[0]:
                self._reject(f"tensors {prev[1]} and {t.name} overlap in slab {t.slab}")
            end[t.slab] = (t.offset + t.nbytes, t.name)

    def _reject(self, problem: str) -> None:
        raise ManifestRejected(
            f"manifest from {self.agent or 'a peer'}: {problem}", agent=self.agent, problem=problem
        )


IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t


def _is_ipc_handle(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == IPC_HANDLE_BYTES
    except ValueError:
        return False


def descriptor_arrays(
    segments_src: list[tuple[int, int, int]],
    slabs: dict[int, SlabInfo] | list[SlabInfo],
) -> np.ndarray:
    """N x 3 uint64 (addr, len, device) from (slab, offset, nbytes) triples."""
    by_index = slabs if isinstance(slabs, dict) else {s.index: s for s in slabs}
    out = np.empty((len(segments_src), 3), dtype=np.uint64)
    for i, (slab, off, n) in enumerate(segments_src):
        s = by_index.get(slab)
        if s is None or off < 0 or n < 0 or off + n > s.nbytes:
            raise ValueError(f"descriptor outside slab {slab}: {off}+{n} > {s.nbytes if s else 0}")
        out[i] = (s.addr + off, n, s.device_id)
    return out

"""The manifest a source serves to its peers, and its typed protobuf form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import ALIGNMENT, Placement
from .proto import ferry_agent_pb2 as _pb
from .slabs import SlabInfo

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
                )
                for s in self.slabs
            ],
            nixl_metadata=self.nixl_metadata if with_metadata else b"",
        )

    @classmethod
    def from_proto(cls, m: Any) -> Manifest:
        slabs = tuple(
            SlabInfo(int(s.index), int(s.addr), int(s.nbytes), str(s.memory), int(s.device_id), "")
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
        )
        man.validate()
        return man

    def validate(self) -> None:
        """Reject manifests whose tensors fall outside their slabs (a peer is not trusted
        to hand us descriptors; we only read inside the slabs it declared)."""
        by_index = {s.index: s for s in self.slabs}
        if len(by_index) != len(self.slabs):
            raise ValueError(f"manifest from {self.agent}: duplicate slab indexes")
        for s in self.slabs:
            if s.memory not in ("DRAM", "VRAM"):
                raise ValueError(f"manifest from {self.agent}: slab {s.index} memory {s.memory!r}")
        for t in self.tensors:
            slab = by_index.get(t.slab)
            if slab is None or t.offset + t.nbytes > slab.nbytes:
                raise ValueError(f"manifest from {self.agent}: tensor {t.name} outside its slab")


def descriptor_arrays(
    segments_src: list[tuple[int, int, int]],
    slabs: dict[int, SlabInfo] | list[SlabInfo],
) -> np.ndarray:
    """N x 3 uint64 (addr, len, device) from (slab, offset, nbytes) triples."""
    by_index = slabs if isinstance(slabs, dict) else {s.index: s for s in slabs}
    out = np.empty((len(segments_src), 3), dtype=np.uint64)
    for i, (slab, off, n) in enumerate(segments_src):
        s = by_index[slab]
        if off + n > s.nbytes:
            raise ValueError(f"descriptor outside slab {slab}: {off}+{n} > {s.nbytes}")
        out[i] = (s.addr + off, n, s.device_id)
    return out

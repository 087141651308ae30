"""Tensor specs, dtypes, layout fingerprints and slab placement.

Placement rule: tensors keep their declared order and are packed into slabs
of at most `slab_bytes`, each starting at a multiple of `ALIGNMENT` bytes.
A tensor larger than `slab_bytes` gets a slab of its own. Two agents that
declare the same specs with the same slab size get identical placements,
which is what lets the planner coalesce a whole slab into one descriptor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# 256 B: what cudaMalloc guarantees and what vectorised (128-bit) kernels and
# every dtype below need; small enough that padding is negligible.
ALIGNMENT = 256

# name -> bytes per element. Names follow torch (`torch.<name>`).
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in {self.shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives: slab index and byte offset inside it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    slab: int
    offset: int
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "slab": self.slab,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d["slab"], d["offset"], d["nbytes"])


@dataclass(frozen=True)
class Layout:
    placements: tuple[Placement, ...]
    slab_sizes: tuple[int, ...]
    fingerprint: str
    alignment: int = ALIGNMENT

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.placements)

    @property
    def specs(self) -> list[TensorSpec]:
        return [p.spec for p in self.placements]

    def by_name(self) -> dict[str, Placement]:
        return {p.name: p for p in self.placements}


def fingerprint(specs: Iterable[TensorSpec]) -> str:
    """sha256 over (name, dtype, shape), order-independent: pairing is by name."""
    h = hashlib.sha256()
    for s in sorted(specs, key=lambda s: s.name):
        h.update(f"{s.name}\0{s.dtype}\0{','.join(map(str, s.shape))}\n".encode())
    return "sha256:" + h.hexdigest()


def plan_layout(specs: Sequence[TensorSpec], slab_bytes: int, alignment: int = ALIGNMENT) -> Layout:
    """Pack `specs` in order into slabs of at most `slab_bytes` (see module doc)."""
    if slab_bytes <= 0 or slab_bytes % alignment:
        raise ValueError(f"slab_bytes must be a positive multiple of {alignment}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ValueError(f"duplicate tensor names: {dup}")
    placements: list[Placement] = []
    sizes: list[int] = []
    used = 0
    for s in specs:
        need = align_up(s.nbytes, alignment)
        # An empty slab takes any tensor, even one larger than slab_bytes.
        if not sizes or (used > 0 and used + need > slab_bytes):
            sizes.append(0)
            used = 0
        placements.append(Placement(s.name, s.dtype, s.shape, len(sizes) - 1, used, s.nbytes))
        used += need
        sizes[-1] = used
    return Layout(
        tuple(placements), tuple(max(sz, alignment) for sz in sizes), fingerprint(specs), alignment
    )

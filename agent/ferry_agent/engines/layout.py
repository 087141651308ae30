"""Which tensors of a torch module (or state dict) go into the agent's slabs, and as what.

Both sides use the same rules, so a trainer's published layout and an engine's
module agree by construction:

tensors   a module's parameters and persistent buffers, in `state_dict` order
          (`state_dict(keep_vars=True)`: non-persistent buffers such as rotary
          `inv_freq` are recomputed by the model, never shipped), or a state dict;
ties      tensors that are the same view of the same storage (tied embeddings)
          are one entry: the first name holds it, the others are its aliases;
          tensors that overlap without being the same view are refused;
filter    `include(name)` keeps a tensor (on the source's own names);
rename    `rename` maps a source name to the served name;
cast      `dtype` gives the served dtype of floating-point tensors.

`describe` is the only part that looks at torch objects; `plan_module_layout`
is a pure function over the records it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..layout import DTYPE_SIZES, TensorSpec

Rename = Mapping[str, str] | Callable[[str], str]
Include = Callable[[str], bool]
# A dtype for every floating-point tensor, or a function (name, dtype) -> dtype.
Cast = str | Callable[[str, str], str]


@dataclass(frozen=True)
class TensorInfo:
    """What the layout needs to know about one named tensor."""

    name: str
    dtype: str  # torch name without the prefix: "bfloat16"
    shape: tuple[int, ...]
    floating: bool
    storage: int  # address of the (local) storage; 0 for empty tensors
    offset: int  # byte offset of the view in its storage
    stride: tuple[int, ...]
    nbytes: int  # bytes the view spans in its storage (0 when empty)
    sharded: bool = False  # a DTensor: `shape` is the global shape
    identity: int = 0  # id() of the tensor object: ties on the meta device have no storage


@dataclass(frozen=True)
class Entry:
    """One tensor of the layout: `name` as served, `source` as the module calls it."""

    name: str
    source: str
    dtype: str  # served dtype (after the cast)
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()  # other source names of the same tensor (ties)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class ModuleLayout:
    entries: tuple[Entry, ...]

    @property
    def specs(self) -> list[TensorSpec]:
        return [e.spec for e in self.entries]

    @property
    def nbytes(self) -> int:
        return sum(e.spec.nbytes for e in self.entries)

    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}


class SharedStorageError(ValueError):
    """Two tensors overlap in memory without being the same view (e.g. a fused qkv
    weight and slices of it): the slabs hold each tensor once, so one must go."""


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _same_view(a: TensorInfo, b: TensorInfo) -> bool:
    return (a.storage, a.offset, a.shape, a.stride, a.dtype) == (
        b.storage,
        b.offset,
        b.shape,
        b.stride,
        b.dtype,
    )


def _overlaps(a: TensorInfo, b: TensorInfo) -> bool:
    return (
        a.storage == b.storage and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
    )


def group_ties(tensors: Sequence[TensorInfo]) -> list[tuple[TensorInfo, tuple[str, ...]]]:
    """(first tensor, names of its aliases) per distinct tensor, in order.

    Raises SharedStorageError naming the first two tensors that overlap without
    being the same view."""
    out: list[tuple[TensorInfo, list[str]]] = []
    by_storage: dict[int, list[int]] = {}
    by_identity: dict[int, int] = {}
    for t in tensors:
        k = by_identity.get(t.identity) if t.identity else None
        if k is None and t.storage and t.nbytes:
            for j in by_storage.get(t.storage, []):
                head = out[j][0]
                if _same_view(head, t):
                    k = j
                    break
                if _overlaps(head, t):
                    raise SharedStorageError(
                        f"{t.name} and {head.name} share memory but are different views "
                        "(e.g. a fused weight and its slices): publish one of them "
                        "(leave the other out with `include`)"
                    )
        if k is None:
            k = len(out)
            out.append((t, []))
            if t.storage and t.nbytes:
                by_storage.setdefault(t.storage, []).append(k)
        else:
            out[k][1].append(t.name)
        if t.identity:
            by_identity[t.identity] = k
    return [(t, tuple(aliases)) for t, aliases in out]


def _renamer(rename: Rename | None) -> Callable[[str], str]:
    if rename is None:
        return str
    if callable(rename):
        return rename
    table = dict(rename)
    return lambda name: table.get(name, name)


def _caster(cast: Cast | None) -> Callable[[TensorInfo], str]:
    if cast is None:
        return lambda t: t.dtype
    if callable(cast):
        return lambda t: cast(t.name, t.dtype)
    target = dtype_name(cast)
    return lambda t: target if t.floating else t.dtype


def plan_module_layout(
    tensors: Iterable[TensorInfo],
    *,
    cast: Cast | None = None,
    rename: Rename | None = None,
    include: Include | None = None,
) -> ModuleLayout:
    """The layout for `tensors` (see the module docstring for the rules)."""
    kept = [t for t in tensors if include is None or include(t.name)]
    served_name, served_dtype = _renamer(rename), _caster(cast)
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for t, aliases in group_ties(kept):
        name, dtype = served_name(t.name), dtype_name(served_dtype(t))
        if dtype not in DTYPE_SIZES:
            raise ValueError(
                f"{t.name}: dtype {dtype} cannot be served (known: {sorted(DTYPE_SIZES)})"
            )
        if name in seen:
            raise ValueError(f"{t.name} and {seen[name]} are both renamed to {name!r}")
        seen[name] = t.name
        entries.append(Entry(name, t.name, dtype, t.shape, aliases))
    return ModuleLayout(tuple(entries))


# -- the torch side -----------------------------------------------------------------------


def named_tensors(source: Any) -> dict[str, Any]:
    """A module's parameters and persistent buffers (`state_dict(keep_vars=True)`: the
    module's own tensor objects, so ties stay the same object), or a state dict as is."""
    if isinstance(source, Mapping):
        return dict(source)
    return dict(source.state_dict(keep_vars=True))


def local_tensor(t: Any) -> Any:
    """The tensor that holds this process's bytes (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def describe(tensors: Mapping[str, Any]) -> list[TensorInfo]:
    out = []
    for name, t in tensors.items():
        local = local_tensor(t)
        empty = local.numel() == 0 or local.device.type == "meta"
        size = local.element_size()
        span = (
            0
            if empty
            else (sum((d - 1) * s for d, s in zip(local.shape, local.stride(), strict=True)) + 1)
            * size
        )
        out.append(
            TensorInfo(
                name=name,
                dtype=dtype_name(t.dtype),
                shape=tuple(int(d) for d in t.shape),
                floating=bool(t.is_floating_point()),
                storage=0 if empty else int(local.untyped_storage().data_ptr()),
                offset=0 if empty else int(local.storage_offset()) * size,
                stride=tuple(int(s) for s in local.stride()),
                nbytes=span,
                sharded=local is not t,
                identity=id(t),
            )
        )
    return out


def module_layout(
    source: Any,
    *,
    cast: Any = None,
    rename: Rename | None = None,
    include: Include | None = None,
) -> ModuleLayout:
    """The layout of a module or state dict (`cast`: a torch dtype, its name, or a function)."""
    if cast is not None and not callable(cast):
        cast = dtype_name(cast)
    return plan_module_layout(
        describe(named_tensors(source)), cast=cast, rename=rename, include=include
    )

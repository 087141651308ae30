"""Content digests of a version: one per piece of each tensor, computed where the bytes are.

    pieces     each tensor is cut at PIECE_BYTES boundaries of its own bytes (placement-
               independent: a target pairs them by tensor name, like the planner)
    compute    host memory: CRC32C (google-crc32c) over the piece's bytes; CUDA slabs:
               "mlh64", a 64-bit multiply-lane hash over int64 words computed with torch
               ops on the device (no host copy). Either algorithm runs on either memory,
               so a CUDA target can check a host source's digests and back (the odd one
               pays a copy or a CPU pass).
    record     Digests: the version, algorithm, piece size and per-tensor digests, and
               `total`, the sha256 over all of them (what the WeightSource status shows)
    select     which pieces a target checks: every piece (`full`), a deterministic window
               of a shuffled order that moves on each pull, so repeated pulls cover every
               piece (`sampled`), or none (`off`)
    compare    the mismatches, by tensor name and byte range (DigestMismatch)

The source computes its digests when it publishes a version (the epoch is still odd: no
peer trusts the bytes yet), so bytes changed after publish — a stray WRITE, a bad DIMM,
a flipped bit on the way — no longer match. A target that verified a version serves the
source's digests with it (DigestBook.adopt), so a relay or tree link downstream checks
against the digests of the origin, not of the hop. Neither algorithm is cryptographic:
they catch corruption and stray writes, not a forger who can also choose the digests
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import DigestMismatch, DigestsUnavailable, FerryError

# 16 MiB: 64 pieces per GiB, so `sampled` can check an eighth of a one-tensor model; on
# host memory CRC32C is ~104 ms/GiB here, so a piece is ~1.6 ms of one core.
PIECE_BYTES = 16 << 20
# `sampled` checks this share of the pieces on each pull (at least one): eight pulls in
# a row cover every piece of a version layout.
SAMPLE_EVERY = 8
MODES = ("full", "sampled", "off")
# Picked from docs/bench/transfer-host-verify-*.json (1 GiB host pull on this machine):
# full adds CRC32C over every byte to the pull, sampled an eighth of it.
DEFAULT_MODE = "sampled"
ALGORITHMS = ("crc32c", "mlh64")
# mlh64: words are processed in blocks of this many int64 (32 MiB), which bounds the
# temporaries torch allocates on the device.
MLH_BLOCK_WORDS = 4 << 20
_MLH_G = 0x9E3779B97F4A7C15  # position multiplier (golden ratio), as int64
_MLH_C = 0xBF58476D1CE4E5B9  # odd lane multiplier (splitmix64)
_M64 = (1 << 64) - 1


def algorithm_for(memory: str) -> str:
    """The algorithm a source of this memory kind computes without moving its bytes."""
    return "mlh64" if memory == "cuda" else "crc32c"


class Piece(NamedTuple):
    """Bytes [start, start + nbytes) of tensor `name`, its `number`-th piece."""

    name: str
    number: int  # its place in the tensor: bytes from number * piece_bytes
    start: int
    nbytes: int


def pieces(placements: Iterable[Any], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Every piece of every tensor, in placement order (a 0-byte tensor has one empty piece)."""
    out = []
    for p in placements:
        n = max(1, -(-p.nbytes // piece_bytes))
        for k in range(n):
            start = k * piece_bytes
            out.append(Piece(p.name, k, start, min(piece_bytes, p.nbytes - start)))
    return out


@dataclass(frozen=True)
class Digests:
    """A version's content digests, as a source publishes them and a target checks them."""

    version: str
    algorithm: str
    piece_bytes: int
    tensors: Mapping[str, tuple[int, ...]]  # one digest per piece, in piece order

    @property
    def total(self) -> str:
        """sha256 over the algorithm, piece size and every tensor's digests (names sorted):
        one string for the WeightSource status, equal on every replica of the version."""
        h = hashlib.sha256(f"{self.algorithm}\n{self.piece_bytes}\n".encode())
        for name in sorted(self.tensors):
            h.update(name.encode() + b"\0")
            h.update(b"".join(d.to_bytes(8, "little") for d in self.tensors[name]))
        return "sha256:" + h.hexdigest()

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.tensors.values())

    def to_proto(self, pb: Any) -> Any:
        return pb.DigestsReply(
            version=self.version,
            algorithm=self.algorithm,
            piece_bytes=self.piece_bytes,
            tensors=[pb.TensorDigests(name=n, pieces=list(d)) for n, d in self.tensors.items()],
            total=self.total,
        )

    @classmethod
    def from_proto(cls, m: Any) -> Digests:
        if m.algorithm not in ALGORITHMS or m.piece_bytes <= 0:
            raise DigestsUnavailable(
                f"digests of {m.version!r}: unknown algorithm {m.algorithm!r} or piece size "
                f"{m.piece_bytes}",
                version=m.version,
            )
        return cls(
            m.version,
            m.algorithm,
            int(m.piece_bytes),
            {t.name: tuple(int(d) for d in t.pieces) for t in m.tensors},
        )


# -- compute -------------------------------------------------------------------------
def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _i64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _mlh_sum(words: Any, first: int) -> Any:
    """Σ t_i over int64 words w_i (global word index first+i), wrapping mod 2**64:
    t = (w + i·G)·C, then t ^= t >>> 29. Each term is a bijection of its word, so any one
    changed word changes the sum; the position term makes moved words count."""
    import torch

    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for b in range(0, words.numel(), MLH_BLOCK_WORDS):
        w = words[b : b + MLH_BLOCK_WORDS]
        idx = torch.arange(first + b, first + b + w.numel(), dtype=torch.int64, device=w.device)
        t = idx.mul_(_i64(_MLH_G)).add_(w).mul_(_i64(_MLH_C))
        t ^= (t >> 29) & ((1 << 35) - 1)  # logical shift: torch shifts int64 arithmetically
        total += t.sum()
    return total


def mlh64_partial(raw: Any) -> Any:
    """The unfinished mlh64 of a uint8 torch tensor (a 0-dim int64 tensor on its device):
    finished by `mlh64_finish`, so that many pieces cost one device-to-host copy."""
    import torch

    n = raw.numel()
    body = n - n % 8
    total = (
        _mlh_sum(raw[:body].view(torch.int64), 0)
        if body
        else torch.zeros((), dtype=torch.int64, device=raw.device)
    )
    if body != n:  # the last 1..7 bytes, zero-padded to a word
        tail = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        tail[: n - body] = raw[body:]
        total = total + _mlh_sum(tail.view(torch.int64), body // 8)
    return total


def mlh64_finish(partial: int, nbytes: int) -> int:
    return _fmix64(((partial & _M64) ^ nbytes) & _M64)


def mlh64(raw: Any) -> int:
    """mlh64 of a uint8 torch tensor (CPU or CUDA), as an unsigned 64-bit int."""
    return mlh64_finish(int(mlh64_partial(raw)), raw.numel())


def crc32c(buf: Any) -> int:
    """CRC32C of a contiguous byte buffer (numpy array, memoryview, bytes)."""
    import google_crc32c

    return int(google_crc32c.value(buf))


def _piece_bytes(slab: Any, offset: int, nbytes: int) -> Any:
    """A uint8 view of the piece: numpy for host slabs, torch (device) for CUDA slabs."""
    if getattr(slab, "memory", "DRAM") == "VRAM":
        return slab.tensor()[offset : offset + nbytes]
    return slab.view(offset, nbytes)


def compute(
    slabs: Sequence[Any],
    placements: Iterable[Any],
    algorithm: str,
    select: Iterable[Piece] | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> dict[tuple[str, int], int]:
    """Digests of the selected pieces (None: every piece) of tensors placed in `slabs`,
    keyed by (tensor name, piece index)."""
    by_name = {p.name: p for p in placements}
    todo = list(select) if select is not None else pieces(by_name.values(), piece_bytes)
    out: dict[tuple[str, int], int] = {}
    pending: list[tuple[Piece, Any]] = []  # mlh64 partial sums still on their device
    for pc in todo:
        p = by_name[pc.name]
        raw = _piece_bytes(slabs[p.slab], p.offset + pc.start, pc.nbytes)
        if algorithm == "crc32c":
            if not hasattr(raw, "__array_interface__"):
                raw = raw.cpu().numpy()  # a CUDA piece checked against a host source
            out[(pc.name, pc.number)] = crc32c(raw)
        elif algorithm == "mlh64":
            if hasattr(raw, "__array_interface__"):
                import torch

                raw = torch.from_numpy(raw)
            pending.append((pc, mlh64_partial(raw)))
        else:
            raise ValueError(f"unknown digest algorithm {algorithm!r}")
    if pending:
        import torch

        # one device-to-host copy (and sync) for every piece: an agent's slabs share a device
        sums = torch.stack([t for _, t in pending]).cpu()
        for (pc, _), s in zip(pending, sums.tolist(), strict=True):
            out[(pc.name, pc.number)] = mlh64_finish(int(s), pc.nbytes)
    return out


def of_version(
    version: str,
    slabs: Sequence[Any],
    placements: Sequence[Any],
    memory: str,
    piece_bytes: int = PIECE_BYTES,
) -> Digests:
    """Every piece's digest, as a source publishes them."""
    algo = algorithm_for(memory)
    got = compute(slabs, placements, algo, None, piece_bytes)
    tensors: dict[str, list[int]] = {p.name: [] for p in placements}
    for (name, _k), d in got.items():  # pieces() yields them in piece order
        tensors[name].append(d)
    return Digests(version, algo, piece_bytes, {n: tuple(v) for n, v in tensors.items()})


# -- select and compare ----------------------------------------------------------------
def select(all_pieces: Sequence[Piece], mode: str, *, seed: str, round: int) -> list[Piece]:
    """The pieces a target checks on its `round`-th pull (see the module doc)."""
    if mode == "off" or not all_pieces:
        return []
    if mode == "full":
        return list(all_pieces)
    if mode != "sampled":
        raise ValueError(f"verify mode {mode!r} is not one of {MODES}")
    order = list(all_pieces)
    random.Random(seed).shuffle(order)
    m = max(1, -(-len(order) // SAMPLE_EVERY))
    start = (round * m) % len(order)
    window = (order + order)[start : start + m]
    return window


def check(expected: Digests, got: Mapping[tuple[str, int], int], source: str = "") -> None:
    """Raise DigestMismatch naming the tensors (and byte ranges) whose digests differ."""
    bad: list[str] = []
    names: list[str] = []
    for (name, k), d in got.items():
        want = expected.tensors.get(name)
        if want is None or k >= len(want):
            problem = f"{name}: no digest for piece {k} in the source's digests"
        elif want[k] != d:
            a = k * expected.piece_bytes
            problem = (
                f"{name}: bytes [{a}, {a + expected.piece_bytes}) digest {d:#x} != {want[k]:#x}"
            )
        else:
            continue
        bad.append(problem)
        if name not in names:
            names.append(name)
    if bad:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DigestMismatch(
            f"content of version {expected.version!r} does not match the digests of "
            f"{source or 'the source'} ({expected.algorithm}): {shown}",
            differences=bad[:20],
            tensors=names[:20],
            version=expected.version,
            source=source,
        )


# -- what an agent serves -----------------------------------------------------------
@dataclass(frozen=True)
class Deferred:
    """A source's digests of `version`, fetched when first asked for: what a `verify:
    off` pull serves its version with, so the pull never waits for them, while a relay or
    a later target that does verify still checks against the origin's digests."""

    version: str
    fetch: Callable[[], Digests]


class DigestBook:
    """The digests of the version an agent serves (GetDigests), and each target rank's
    sampling round. `lock`: the agent's state lock (a record changes with the version)."""

    def __init__(self, lock: threading.RLock, seed: str) -> None:
        self._lock = lock
        self._record: Digests | Deferred | None = None
        self.seed = seed  # agent name: targets sample different windows
        self.round = 0

    def get(self, version: str) -> Digests | None:
        """The record of `version`; a Deferred one is fetched here (outside the lock),
        once: a source that cannot answer any more leaves the version without digests."""
        with self._lock:
            r = self._record
        if isinstance(r, Deferred) and r.version == version:
            try:
                got: Digests | None = r.fetch()
            except FerryError:  # no digests there, or the source is gone: nothing to hand on
                got = None
            with self._lock:
                if self._record is r:
                    self._record = got
            return got
        return r if isinstance(r, Digests) and r.version == version else None

    def adopt(self, record: Digests | Deferred | None) -> None:
        with self._lock:
            self._record = record

    def next_round(self) -> int:
        with self._lock:
            self.round += 1
            return self.round - 1

"""Which version an agent serves, and the seqlock its peers fence their pulls with.

The epoch is the sequence number: even while the slabs hold a stable set (a version,
or none), odd while something writes them. Every change of version, write state or
slabs bumps it, so a reader that sees the same (nonce, epoch, generation) before and
after its READs read exactly one version. The nonce is random per agent process: a
restarted peer never matches what a target remembered of the old one.

The same words live in a small NIXL-registered header (VersionHeader) that targets READ
before and after their data READs, so a warm refit cycle makes no RPC to its sources.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .slabs import SHM_DIR, HostSlab

PAGE = 4096  # slabs.PAGE


def is_writing(epoch: int) -> bool:
    """Odd epochs: the slabs are being written; nothing read from them now is a version."""
    return epoch % 2 == 1


def next_stable(epoch: int) -> int:
    """The next even epoch after `epoch` (always larger: a stable epoch is never reused)."""
    return epoch + 2 - epoch % 2


class HeaderWords(NamedTuple):
    """The words a version header holds, in this order."""

    nonce: int
    epoch: int
    generation: int

    def same_agent_and_slabs(self, other: HeaderWords) -> bool:
        return self.nonce == other.nonce and self.generation == other.generation


class HeaderRegion(NamedTuple):
    """Where a peer's version header lives (VersionInfo.header_*); addr 0: it has none."""

    addr: int
    nbytes: int
    device: int
    memory: str  # "DRAM" | "VRAM"


class VersionHeader:
    """A tiny registered region: (nonce, epoch, generation, version length) as uint64s,
    then the version string (UTF-8, at most MAX_VERSION bytes; longer: length 2**63).

    A source keeps its own header equal to its version state; a target READs a source's
    header into its own (a landing buffer) before and after the data. The agent keeps
    both in host memory by default (no CUDA copy to write or read them;
    `header_memory="slab"` puts them in VRAM on CUDA agents). Kept referenced for its
    registered life."""

    NBYTES = 256
    MAX_VERSION = NBYTES - 32

    def __init__(self, memory: str, device: int = 0, shm_prefix: str = ""):
        """`shm_prefix` (host memory): keep the header in a POSIX shm file of that prefix
        (slabs.slab_prefix), so that a target in the same pod maps it and reads it with
        no NIXL round trip (`shm_name`; on one H200 the two header READs over tcp/lo were
        0.24 ms of a 4.8 ms same-GPU 8 GB cycle)."""
        self.memory = "VRAM" if memory == "cuda" else "DRAM"
        self.device_id = device if memory == "cuda" else 0
        self._cuda: Any = None
        self._shm: Any = None
        self.shm_name = ""
        if memory != "cuda" and shm_prefix:
            self._shm = HostSlab.create(0, PAGE, prefix=shm_prefix)
            self.shm_name = self._shm.name
            # the region itself
            self._host = np.frombuffer(self._shm.array, np.uint64, count=self.NBYTES // 8)
        else:  # staging (cuda) or the region itself
            self._host = np.zeros(self.NBYTES // 8, np.uint64)
        if memory == "cuda":
            from .cuda import CudaSlab

            self._cuda = CudaSlab.create(0, PAGE, device=device)
            self.addr = self._cuda.addr
        else:
            self.addr = int(self._host.ctypes.data)

    @property
    def region(self) -> tuple[int, int, int]:
        return (self.addr, self.NBYTES, self.device_id)

    def write(self, words: HeaderWords, version: str) -> None:
        """The words go after the version bytes: a READ torn by a concurrent change sees a
        version that the READ after the data (which compares the words) rejects."""
        raw = version.encode()
        n = len(raw) if len(raw) <= self.MAX_VERSION else 1 << 63
        b = self._host.view(np.uint8)
        if n <= self.MAX_VERSION:
            b[32 : 32 + n] = np.frombuffer(raw, np.uint8)
        self._host[3] = n
        self._host[:3] = tuple(words)
        if self._cuda is not None:
            from .cuda import memcpy, set_device

            set_device(self.device_id)
            memcpy(self.addr, int(self._host.ctypes.data), self.NBYTES)

    def read(self) -> tuple[HeaderWords, str | None]:
        """(words, version); version None when it did not fit (ask GetVersion)."""
        if self._cuda is not None:
            from .cuda import memcpy, set_device

            set_device(self.device_id)
            memcpy(int(self._host.ctypes.data), self.addr, self.NBYTES)
        return parse_header(self._host)

    def close(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        if self._shm is not None:
            self._host = np.zeros(self.NBYTES // 8, np.uint64)  # drop the view of the mapping
            self._shm.close()
            self._shm = None


def parse_header(raw: np.ndarray) -> tuple[HeaderWords, str | None]:
    """A header's (words, version) from its NBYTES // 8 uint64 words (a snapshot)."""
    words = HeaderWords(*(int(x) for x in raw[:3]))
    n = int(raw[3])
    if n > VersionHeader.MAX_VERSION:
        return words, None
    return words, raw.view(np.uint8)[32 : 32 + n].tobytes().decode(errors="replace")


class MappedHeader:
    """A same-pod peer's header file, mapped read-only: each read() copies it once (a
    snapshot, torn at worst, which the fence's comparison of words rejects)."""

    def __init__(self, name: str) -> None:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad shm name {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
        try:
            self._mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name

    def read(self) -> tuple[HeaderWords, str | None]:
        raw = np.frombuffer(self._mm[: VersionHeader.NBYTES], np.uint64)
        return parse_header(raw)

    def close(self) -> None:
        self._mm.close()


class VersionSnapshot(NamedTuple):
    version: str  # "" when the slabs hold no complete version
    epoch: int
    generation: int


class VersionState:
    """The served version and epoch, mirrored into `header` on every change.

    `generation` reads the slab store's generation (it is a header word). `lock` is the
    agent's state lock, shared with the slab store, so a manifest sees slabs and
    versions of one moment."""

    def __init__(self, header: VersionHeader, generation: Callable[[], int], lock: threading.RLock):
        self.nonce = secrets.randbits(63) | 1
        self.header = header
        self._generation = generation
        self._lock = lock
        self._epoch = 0
        self._version = ""
        self._write()

    def snapshot(self) -> VersionSnapshot:
        with self._lock:
            return VersionSnapshot(self._version, self._epoch, self._generation())

    @property
    def version(self) -> str:
        return self._version

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def writing(self) -> bool:
        return is_writing(self._epoch)

    def words(self) -> HeaderWords:
        with self._lock:
            return HeaderWords(self.nonce, self._epoch, self._generation())

    def begin_write(self) -> int:
        """The slabs are being written (odd epoch): peers will not trust a pull."""
        with self._lock:
            if not is_writing(self._epoch):
                self._epoch += 1
                self._write()
            return self._epoch

    def publish(self, version: str) -> int:
        """New weights are in place: serve them as `version` (next even epoch)."""
        if not version:
            raise ValueError("version must not be empty")
        with self._lock:
            self._epoch, self._version = next_stable(self._epoch), version
            self._write()
            return self._epoch

    def clear(self) -> None:
        """Serve no version: the slabs hold a partial pull, or were just (re)allocated."""
        with self._lock:
            self._epoch, self._version = next_stable(self._epoch), ""
            self._write()

    def _write(self) -> None:
        self.header.write(HeaderWords(self.nonce, self._epoch, self._generation()), self._version)

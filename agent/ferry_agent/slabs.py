"""Weight memory: a few large slabs the agent owns and registers with NIXL once.

Host mode: POSIX shared memory (a file under /dev/shm), so the engine process
maps the very same bytes. CUDA mode: plain `cudaMalloc` (see cuda.py), never
expandable segments, exported to the engine as CUDA IPC handles.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
PAGE = 4096


@dataclass(frozen=True)
class SlabInfo:
    """What a peer or the engine needs to know about a slab (typed, no pickles)."""

    index: int
    addr: int
    nbytes: int
    memory: str  # "DRAM" | "VRAM"
    device_id: int  # NIXL device id: 0 for DRAM, the CUDA ordinal for VRAM
    handle: str  # shm name (host) or hex CUDA IPC handle (cuda)


def _madvise_populate(addr: int, nbytes: int) -> bool:
    """MADV_POPULATE_WRITE (Linux 5.14): fault pages in without touching them from Python."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), 23) == 0


class HostSlab:
    """A POSIX shared-memory slab. The creator unlinks it on close()."""

    memory = "DRAM"
    device_id = 0

    def __init__(self, index: int, name: str, nbytes: int, mm: mmap.mmap, owner: bool):
        self.index = index
        self.name = name
        self.nbytes = nbytes
        self._mm: mmap.mmap | None = mm
        self._array: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
        self.addr = int(self._array.ctypes.data)
        self.owner = owner

    @classmethod
    def create(
        cls, index: int, nbytes: int, *, prefix: str = "ferry", prefault: bool = True
    ) -> HostSlab:
        name = f"{prefix}-{os.getpid()}-{index}-{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        slab = cls(index, name, nbytes, mm, owner=True)
        if prefault:
            slab.prefault()
        return slab

    @classmethod
    def attach(cls, index: int, name: str, nbytes: int) -> HostSlab:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad shm name {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(index, name, nbytes, mm, owner=False)

    def prefault(self) -> None:
        """Fault every page in now: a first-touch fault per 4 KiB page inside a NIXL READ
        costs more than the copy itself (measured: ~2x slower cold pulls)."""
        if not _madvise_populate(self.addr, self.nbytes):
            self.array[::PAGE] = 0

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"slab {self.name} is closed")
        return self._array

    @property
    def info(self) -> SlabInfo:
        return SlabInfo(self.index, self.addr, self.nbytes, self.memory, self.device_id, self.name)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.array[offset : offset + nbytes]

    def close(self) -> None:
        self._array = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still exported: the mapping dies with them
                pass
            self._mm = None
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


def reap_stale(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink slabs named `{prefix}-{pid}-...` whose creating process is gone.

    A killed agent cannot unlink its slabs, and a pod's /dev/shm (an emptyDir)
    outlives a container restart: without this, every crash would leak a
    weight set's worth of memory."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix + "-"):
            continue
        parts = name[len(prefix) + 1 :].split("-")
        # exactly {pid}-{index}-{hex}: "ferry-w-1-..." is pod "w-1", not pod "w"
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue
        pid_text = parts[0]
        if int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def create_slabs(
    sizes: tuple[int, ...], memory: str, *, prefix: str, device: int = 0, prefault: bool = True
) -> list[Any]:
    if memory == "host":
        out: list[Any] = []
        try:
            for i, n in enumerate(sizes):
                out.append(HostSlab.create(i, n, prefix=prefix, prefault=prefault))
        except BaseException:
            for s in out:
                s.close()
            raise
        return out
    if memory == "cuda":
        from .cuda import CudaSlab

        return [CudaSlab.create(i, n, device=device) for i, n in enumerate(sizes)]
    raise ValueError(f"memory must be host or cuda, not {memory!r}")


class VersionHeader:
    """A tiny registered region: (nonce, epoch, generation, version length) as uint64s,
    then the version string (UTF-8, at most MAX_VERSION bytes; longer: length 2**63).

    A source keeps its own header equal to its version fields; a target READs a
    source's header into its own (a landing buffer) before and after the data, so
    the check needs no RPC. The agent keeps both in host memory by default (no CUDA
    copy to write or read them; `header_memory="slab"` puts them in VRAM on CUDA
    agents). Kept referenced for its registered life."""

    NBYTES = 256
    WORDS = 3
    MAX_VERSION = NBYTES - 32

    def __init__(self, memory: str, device: int = 0):
        self.memory = "VRAM" if memory == "cuda" else "DRAM"
        self.device_id = device if memory == "cuda" else 0
        self._host = np.zeros(self.NBYTES // 8, np.uint64)  # staging (cuda) or the region itself
        self._cuda: Any = None
        if memory == "cuda":
            from .cuda import CudaSlab

            self._cuda = CudaSlab.create(0, PAGE, device=device)
            self.addr = self._cuda.addr
        else:
            self.addr = int(self._host.ctypes.data)

    @property
    def region(self) -> tuple[int, int, int]:
        return (self.addr, self.NBYTES, self.device_id)

    def write(self, words: tuple[int, ...], version: str) -> None:
        """Every change bumps the epoch word (publish, begin_write, re-declare), and the
        words go after the version bytes: a READ torn by a concurrent change sees a
        version that the READ after the data (which compares the words) rejects."""
        raw = version.encode()
        n = len(raw) if len(raw) <= self.MAX_VERSION else 1 << 63
        b = self._host.view(np.uint8)
        if n <= self.MAX_VERSION:
            b[32 : 32 + n] = np.frombuffer(raw, np.uint8)
        self._host[3] = n
        self._host[: self.WORDS] = words
        if self._cuda is not None:
            from .cuda import memcpy, set_device

            set_device(self.device_id)
            memcpy(self.addr, int(self._host.ctypes.data), self.NBYTES)

    def read(self) -> tuple[tuple[int, ...], str | None]:
        """(words, version); version None when it did not fit (ask GetVersion)."""
        if self._cuda is not None:
            from .cuda import memcpy, set_device

            set_device(self.device_id)
            memcpy(int(self._host.ctypes.data), self.addr, self.NBYTES)
        words = tuple(int(x) for x in self._host[: self.WORDS])
        n = int(self._host[3])
        if n > self.MAX_VERSION:
            return words, None
        return words, self._host.view(np.uint8)[32 : 32 + n].tobytes().decode(errors="replace")

    def close(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None

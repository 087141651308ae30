"""Weight memory: a few large slabs the agent owns and registers with NIXL once.

Host mode: POSIX shared memory (a file under /dev/shm), so the engine process
maps the very same bytes. CUDA mode: plain `cudaMalloc` (see cuda.py), never
expandable segments, exported to the engine as CUDA IPC handles.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import secrets
from typing import Any

import numpy as np

from .memory import SlabInfo

SHM_DIR = "/dev/shm"
PAGE = 4096


def _madvise_populate(addr: int, nbytes: int) -> bool:
    """MADV_POPULATE_WRITE (Linux 5.14): fault pages in without touching them from Python."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), 23) == 0


class HostSlab:
    """A POSIX shared-memory slab. The creator unlinks it on close()."""

    memory = "DRAM"
    device_id = 0

    def __init__(
        self, index: int, name: str, nbytes: int, mm: mmap.mmap, owner: bool, lock_fd: int = -1
    ):
        self.index = index
        self.name = name
        self.nbytes = nbytes
        self._mm: mmap.mmap | None = mm
        self._array: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
        self.addr = int(self._array.ctypes.data)
        self.owner = owner
        self._lock_fd = lock_fd  # the creator's open file, holding the flock

    @classmethod
    def create(
        cls, index: int, nbytes: int, *, prefix: str = "ferry", prefault: bool = True
    ) -> HostSlab:
        """A new slab named `{prefix}_{index}_{random}` (see slab_prefix), held with an
        exclusive flock for as long as it exists: the lock, not a PID, says that its
        creator is alive (reap_stale)."""
        name = f"{prefix}_{index}_{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            os.close(fd)
            raise
        slab = cls(index, name, nbytes, mm, owner=True, lock_fd=fd)
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def slab_prefix(owner: str, kind: str, start: str) -> str:
    """`{owner}_{kind}_{start}`: owner is `{shm_prefix}-{pod}` (pod names never hold "_"),
    kind says which slabs (r0, r1: a local rank's weights; r0x: its scratch), start is
    random per agent start."""
    return f"{owner}_{kind}_{start}"


def reap_stale(owner: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the slabs of `owner` (see slab_prefix) that no live process holds.

    A killed agent cannot unlink its slabs, and a pod's /dev/shm (an emptyDir) outlives
    a container restart: without this, every crash would leak a weight set's worth of
    memory. A PID cannot tell: in a container the restarted agent is PID 1 again, so a
    slab's creator holds an exclusive flock on it for its whole life, and a slab whose
    lock can be taken is its dead creator's."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(owner + "_") or len(name[len(owner) + 1 :].split("_")) != 4:
            continue
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its creator is alive
            os.close(fd)
            continue
        try:  # unlinked while we hold the lock: nobody can have taken the slab since
            os.unlink(path)
            removed.append(name)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
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

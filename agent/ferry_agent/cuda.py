"""CUDA slabs: plain cudaMalloc memory, exported as CUDA IPC handles.

We call the CUDA runtime through ctypes instead of PyTorch's caching allocator:
a dedicated allocation per slab is plain `cudaMalloc` regardless of
`PYTORCH_CUDA_ALLOC_CONF` (expandable segments register fine with NIXL but then
transfer over TCP or fail on NICs; see NIXL-NOTES), it is never recycled for
another tensor, and it lives exactly as long as its registration.
Engines get torch views through `__cuda_array_interface__`, no copy.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Any

IPC_HANDLE_BYTES = 64
CUDA_IPC_LAZY_ENABLE_PEER_ACCESS = 1
_cudart: ctypes.CDLL | None = None


class CudaError(RuntimeError):
    pass


class IpcMemHandle(ctypes.Structure):
    """cudaIpcMemHandle_t: passed *by value* to cudaIpcOpenMemHandle (a bare ctypes
    array would decay to a pointer)."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


def _candidates() -> list[str]:
    """libcudart already mapped in this process (torch's), then the pip wheels, then the system."""
    out: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if "libcudart.so" in os.path.basename(path) and path not in out:
                    out.append(path)
    except OSError:
        pass
    for base in sys.path:
        out.extend(sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*"))))
        out.extend(sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcudart.so*"))))
    out.extend(["libcudart.so", "libcudart.so.13", "libcudart.so.12"])
    return out


def cudart() -> ctypes.CDLL:
    global _cudart
    if _cudart is not None:
        return _cudart
    try:  # let torch load (and initialise) the runtime it was built with first
        import torch

        if torch.cuda.is_available():
            torch.cuda.init()
    except Exception:
        pass
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.cudaMalloc  # noqa: B018 - probe the symbol
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        _cudart = lib
        return lib
    raise CudaError("CUDA runtime (libcudart) not found: " + "; ".join(errors[-3:]))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = cudart()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        raise CudaError(f"{what} failed: {rc} {lib.cudaGetErrorString(rc).decode()}")


def set_device(device: int) -> None:
    """Make `device` current on this thread (UCX's cuda transports use the thread's context)."""
    _check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


def memcpy(dst: int, src: int, nbytes: int) -> None:
    """Synchronous cudaMemcpy between any two addresses (cudaMemcpyDefault: UVA decides)."""
    _check(
        cudart().cudaMemcpy(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), ctypes.c_int(4)
        ),
        "cudaMemcpy",
    )


def pci_bus_id(device: int) -> str:
    """The device's PCI bus id ("0000:1B:00.0"): with the host's boot id, which GPU this is."""
    buf = ctypes.create_string_buffer(32)
    _check(
        cudart().cudaDeviceGetPCIBusId(buf, ctypes.c_int(32), ctypes.c_int(device)),
        f"cudaDeviceGetPCIBusId({device})",
    )
    return buf.value.decode()


CUDA_MEMCPY_DEVICE_TO_DEVICE = 3
CUDA_STREAM_NON_BLOCKING = 1
CUDA_EVENT_DISABLE_TIMING = 2
CUDA_ERROR_NOT_READY = 600


class CopyStream:
    """A non-blocking CUDA stream for device-to-device copies, with events to see which
    of the copies queued so far have finished (without blocking the host)."""

    def __init__(self, device: int) -> None:
        self.device = device
        set_device(device)
        self._stream = ctypes.c_void_p()
        _check(
            cudart().cudaStreamCreateWithFlags(
                ctypes.byref(self._stream), ctypes.c_uint(CUDA_STREAM_NON_BLOCKING)
            ),
            "cudaStreamCreateWithFlags",
        )

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        _check(
            cudart().cudaMemcpyAsync(
                ctypes.c_void_p(dst),
                ctypes.c_void_p(src),
                ctypes.c_size_t(nbytes),
                ctypes.c_int(CUDA_MEMCPY_DEVICE_TO_DEVICE),
                self._stream,
            ),
            "cudaMemcpyAsync",
        )

    def mark(self) -> Any:
        """An event recorded after everything queued so far (query it with done())."""
        ev = ctypes.c_void_p()
        lib = cudart()
        _check(
            lib.cudaEventCreateWithFlags(
                ctypes.byref(ev), ctypes.c_uint(CUDA_EVENT_DISABLE_TIMING)
            ),
            "cudaEventCreateWithFlags",
        )
        _check(lib.cudaEventRecord(ev, self._stream), "cudaEventRecord")
        return ev

    @staticmethod
    def done(event: Any) -> bool:
        rc = cudart().cudaEventQuery(event)
        if rc == CUDA_ERROR_NOT_READY:
            return False
        _check(rc, "cudaEventQuery")
        return True

    @staticmethod
    def wait(event: Any) -> None:
        """Block until the event's copies finished (no polling: it returns when they do)."""
        _check(cudart().cudaEventSynchronize(event), "cudaEventSynchronize")

    @staticmethod
    def release(event: Any) -> None:
        _check(cudart().cudaEventDestroy(event), "cudaEventDestroy")

    def synchronize(self) -> None:
        _check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream.value:
            self.synchronize()
            _check(cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = ctypes.c_void_p()


class CudaArray:
    """`__cuda_array_interface__` over raw device memory so torch can wrap it without a copy."""

    def __init__(self, addr: int, nbytes: int, owner: Any):
        self._owner = owner  # keeps the slab (and its mapping) alive while views exist
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (addr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


class CudaSlab:
    memory = "VRAM"

    def __init__(self, index: int, addr: int, nbytes: int, device: int, handle: bytes, owner: bool):
        self.index = index
        self.addr = addr
        self.nbytes = nbytes
        self.device_id = device
        self.ipc_handle = handle
        self.owner = owner
        self._open = True

    @classmethod
    def create(cls, index: int, nbytes: int, *, device: int = 0) -> CudaSlab:
        lib = cudart()
        set_device(device)
        ptr = ctypes.c_void_p()
        _check(lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), f"cudaMalloc({nbytes})")
        _check(lib.cudaMemset(ptr, 0, ctypes.c_size_t(nbytes)), "cudaMemset")
        handle = IpcMemHandle()
        _check(lib.cudaIpcGetMemHandle(ctypes.byref(handle), ptr), "cudaIpcGetMemHandle")
        return cls(index, int(ptr.value or 0), nbytes, device, bytes(handle), owner=True)

    @classmethod
    def attach(cls, index: int, handle_hex: str, nbytes: int, device: int) -> CudaSlab:
        raw = bytes.fromhex(handle_hex)
        if len(raw) != IPC_HANDLE_BYTES:
            raise ValueError(f"CUDA IPC handle must be {IPC_HANDLE_BYTES} bytes, got {len(raw)}")
        lib = cudart()
        set_device(device)
        handle = IpcMemHandle.from_buffer_copy(raw)
        ptr = ctypes.c_void_p()
        _check(
            lib.cudaIpcOpenMemHandle(
                ctypes.byref(ptr), handle, ctypes.c_uint(CUDA_IPC_LAZY_ENABLE_PEER_ACCESS)
            ),
            "cudaIpcOpenMemHandle",
        )
        return cls(index, int(ptr.value or 0), nbytes, device, raw, owner=False)

    @property
    def name(self) -> str:
        return self.ipc_handle.hex()

    @property
    def info(self):
        from .memory import SlabInfo

        return SlabInfo(self.index, self.addr, self.nbytes, self.memory, self.device_id, self.name)

    def tensor(self):
        """The whole slab as a torch uint8 CUDA tensor (a view, no copy)."""
        import torch

        return torch.as_tensor(
            CudaArray(self.addr, self.nbytes, self), device=f"cuda:{self.device_id}"
        )

    def prefault(self) -> None:  # device memory is resident once allocated
        return None

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        lib = cudart()
        if self.owner:
            _check(lib.cudaFree(ctypes.c_void_p(self.addr)), "cudaFree")
        else:
            _check(lib.cudaIpcCloseMemHandle(ctypes.c_void_p(self.addr)), "cudaIpcCloseMemHandle")

"""Why a NIXL pull would run over TCP where a faster path exists, said once per source.

UCX picks its transport per pair of endpoints and NIXL does not say which it chose,
but the reasons it has to fall back to TCP are mostly visible before the pull:

- source on our own GPU, pulled over NIXL (`--same-gpu nixl`): UCX runs it over
  tcp/lo (0.54 GB/s for 8 GB against a 2,107 GB/s device-to-device copy on one H200,
  NIXL-NOTES; the CUDA IPC copy reaches 0.9x of that). A source whose slabs cannot be
  opened through CUDA IPC is reported by ipc.py.
- `UCX_TLS` leaving out the transport that pair needs: `cuda_ipc` between GPUs of one
  host, shared memory (`sm`: cma, posix, sysv...) between host-memory processes of one
  host, RDMA (`rc`/`dc`/`ud`) across hosts when this node has an RDMA device.
- `UCX_NET_DEVICES` naming none of this node's RDMA devices, across hosts.

`reason` is the pure decision; `FallbackWarnings` logs each reason once per source.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# UCX transports and the aliases that name their group (ucx_info -d; UCX_TLS accepts
# either, and a prefix such as `rc` stands for rc_verbs and rc_mlx5).
CUDA_IPC, CUDA_ALIASES = ("cuda_ipc",), ("cuda",)
SHARED_MEMORY, SHARED_MEMORY_ALIASES = ("posix", "sysv", "cma", "xpmem", "knem"), ("sm", "shm")
RDMA = (
    "rc_verbs",
    "rc_v",
    "rc_mlx5",
    "rc_x",
    "dc_mlx5",
    "dc_x",
    "ud_verbs",
    "ud_v",
    "ud_mlx5",
    "ud_x",
)
RDMA_ALIASES = ("ib",)
INFINIBAND = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class Peer:
    """Where one side's slabs are: host boot id, GPU PCI bus id ("" for host memory)."""

    host: str
    device: str
    memory: str  # host | cuda


def _covers(item: str, transport: str) -> bool:
    return transport == item or transport.startswith(item + "_")


def tls_allows(tls: str | None, transports: Sequence[str], aliases: Sequence[str] = ()) -> bool:
    """Whether UCX_TLS lets UCX use any of `transports`: unset or `all` allows everything;
    a list allows what it names (a transport, its prefix, or its group's alias); `^a,b`
    allows everything but a and b (the family is out once its alias, or every one of its
    transports, is)."""
    value = (tls or "").strip()
    if not value or value == "all":
        return True
    if value.startswith("^"):
        out = {t.strip() for t in value[1:].split(",") if t.strip()}
        if out & set(aliases):
            return False
        return not all(any(_covers(t, n) for t in out) for n in transports)
    listed = {t.strip() for t in value.split(",") if t.strip()}
    return bool(listed & {"all", *aliases}) or any(
        _covers(t, n) for t in listed for n in transports
    )


def rdma_devices(root: Path = INFINIBAND) -> list[str]:
    """This node's RDMA devices (mlx5_0, ...), empty when it has none."""
    try:
        return sorted(p.name for p in root.iterdir())
    except OSError:
        return []


def reason(
    here: Peer, there: Peer, *, ipc_copier: bool, env: Mapping[str, str], rdma: Sequence[str]
) -> str | None:
    """Why a NIXL pull from `there` into `here` would go over TCP where this machine
    has a faster path, or None. `ipc_copier`: this agent copies same-GPU sources
    through CUDA IPC (a refusal to open them is warned about by ipc.py)."""
    tls = env.get("UCX_TLS")
    shown = f"UCX_TLS={tls}"
    if here.host and here.host == there.host:
        if here.memory == "cuda" and there.memory == "cuda":
            if here.device and here.device == there.device:
                if not ipc_copier:
                    return (
                        "the source is on this GPU and --same-gpu nixl (FERRY_SAME_GPU) sends it "
                        "through NIXL, which UCX runs over tcp/lo on one GPU (~0.5 GB/s); "
                        "use --same-gpu ipc"
                    )
                return None
            if not tls_allows(tls, CUDA_IPC, CUDA_ALIASES):
                return (
                    f"the source is on another GPU of this host but {shown} leaves out cuda_ipc "
                    "(NVLink/PCIe peer copies): UCX runs the pull over TCP; add cuda_ipc"
                )
            return None
        if not tls_allows(tls, SHARED_MEMORY, SHARED_MEMORY_ALIASES):
            return (
                f"the source is on this host but {shown} leaves out shared memory (sm: cma, "
                "posix, sysv): UCX runs the pull over TCP; add sm"
            )
        return None
    if not rdma:
        return None  # no faster path on this node: TCP is what there is
    if not tls_allows(tls, RDMA, RDMA_ALIASES):
        return (
            f"the source is on another host and this node has RDMA devices ({', '.join(rdma)}) "
            f"but {shown} leaves out RDMA (rc, dc, ud): UCX runs the pull over TCP; add rc or ib"
        )
    devices = env.get("UCX_NET_DEVICES", "").strip()
    if devices and devices != "all":
        named = {d.strip().split(":")[0] for d in devices.split(",")}
        if not named & set(rdma):
            return (
                f"the source is on another host but UCX_NET_DEVICES={devices} names none of this "
                f"node's RDMA devices ({', '.join(rdma)}): UCX runs the pull over TCP"
            )
    return None


class FallbackWarnings:
    """Logs `reason` for a source once per (source, reason), not on every pull."""

    def __init__(
        self,
        here: Peer,
        ipc_copier: bool,
        env: Mapping[str, str] | None = None,
        rdma: Sequence[str] | None = None,
    ) -> None:
        self.here, self.ipc_copier = here, ipc_copier
        self.env = dict(os.environ if env is None else env)
        self.rdma = list(rdma_devices() if rdma is None else rdma)
        self._lock = threading.Lock()
        self._said: set[tuple[str, str]] = set()

    def check(self, endpoint: str, there: Peer) -> str | None:
        why = reason(self.here, there, ipc_copier=self.ipc_copier, env=self.env, rdma=self.rdma)
        if why is None:
            return None
        with self._lock:
            if (endpoint, why) in self._said:
                return why
            self._said.add((endpoint, why))
        log.warning("pull from %s falls back to TCP: %s", endpoint, why)
        return why

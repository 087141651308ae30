"""UCX rail pinning: pick the RDMA NIC(s) closest to this agent's GPU from sysfs.

Distance follows `nvidia-smi topo` (best first):
  PIX   both under the same PCIe switch (at most one bridge each below the common one)
  PXB   under the same root port, through several bridges
  PHB   only the host bridge (root complex) in common
  NODE  different host bridges, same NUMA node
  SYS   different NUMA nodes
Ports that are not ACTIVE or whose netdev is enslaved to a bond are skipped.
The result is *assigned* to UCX_NET_DEVICES before the NIXL agent exists:
an inherited value from another component would otherwise funnel every
transfer through one NIC (NIXL-NOTES).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
TIERS = ("PIX", "PXB", "PHB", "NODE", "SYS")
ENV = "UCX_NET_DEVICES"


@dataclass(frozen=True)
class Nic:
    device: str
    port: int
    state: str
    # PCI path from the host bridge, e.g. ("pci0000:00", "0000:00:01.0", ...)
    chain: tuple[str, ...]
    numa: int
    bonded: bool

    @property
    def ucx_name(self) -> str:
        return f"{self.device}:{self.port}"

    @property
    def healthy(self) -> bool:
        return self.state == "ACTIVE" and not self.bonded


@dataclass(frozen=True)
class RailDecision:
    mode: str
    devices: tuple[str, ...]
    reason: str


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def pci_chain(path: Path) -> tuple[str, ...]:
    """('pci0000:00', '0000:00:01.0', ..., endpoint) from a resolved sysfs device path."""
    parts = Path(os.path.realpath(path)).parts
    for i, p in enumerate(parts):
        if p.startswith("pci") and ":" in p:
            return tuple(parts[i:])
    return ()


def _numa(path: Path) -> int:
    try:
        return int(_read(path / "numa_node", "-1"))
    except ValueError:
        return -1


def _bonded(sysfs: Path, dev: str, netdevs: list[str]) -> bool:
    if "bond" in dev:
        return True
    for nd in netdevs:
        master = sysfs / "class" / "net" / nd / "master"
        if master.exists() and (Path(os.path.realpath(master)) / "bonding").exists():
            return True
    return False


def read_nics(sysfs_root: str | Path = "/sys") -> list[Nic]:
    sysfs = Path(sysfs_root)
    base = sysfs / "class" / "infiniband"
    if not base.is_dir():
        return []
    out = []
    for dev in sorted(os.listdir(base)):
        ddir = base / dev
        pci = ddir / "device"
        chain = pci_chain(pci)
        numa = _numa(pci)
        netdevs = sorted(os.listdir(pci / "net")) if (pci / "net").is_dir() else []
        bonded = _bonded(sysfs, dev, netdevs)
        ports = sorted(os.listdir(ddir / "ports"), key=int) if (ddir / "ports").is_dir() else []
        for p in ports:
            state = _read(ddir / "ports" / p / "state").split(":")[-1].strip()
            out.append(Nic(dev, int(p), state, chain, numa, bonded))
    return out


def distance(a: tuple[str, ...], b: tuple[str, ...], numa_a: int, numa_b: int) -> str:
    if not a or not b or a[0] != b[0]:
        return "NODE" if numa_a == numa_b and numa_a >= 0 else "SYS"
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    if common <= 1:
        return "PHB"
    return "PIX" if max(len(a), len(b)) - common <= 2 else "PXB"


def gpu_pci(index: int, sysfs_root: str | Path = "/sys") -> str | None:
    """PCI address of CUDA device `index`: from torch when it can tell, else the index-th
    NVIDIA display/3D controller by PCI address (CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(index)
            ids = [int(getattr(p, f"pci_{k}_id", -1)) for k in ("domain", "bus", "device")]
            if min(ids) >= 0:
                return f"{ids[0]:04x}:{ids[1]:02x}:{ids[2]:02x}.0"
    except Exception:
        pass
    devs = sysfs_devices(sysfs_root)
    gpus = [
        d
        for d in devs
        if _read(Path(sysfs_root) / "bus/pci/devices" / d / "vendor") == "0x10de"
        and _read(Path(sysfs_root) / "bus/pci/devices" / d / "class").startswith(
            ("0x0302", "0x0300")
        )
    ]
    return gpus[index] if index < len(gpus) else None


def sysfs_devices(sysfs_root: str | Path) -> list[str]:
    d = Path(sysfs_root) / "bus" / "pci" / "devices"
    return sorted(os.listdir(d)) if d.is_dir() else []


def rank(nics: list[Nic], chain: tuple[str, ...], numa: int) -> list[tuple[str, Nic]]:
    """Healthy NICs, closest first (tier, then same NUMA node, then name)."""
    scored = [(distance(chain, n.chain, numa, n.numa), n) for n in nics if n.healthy]
    scored.sort(key=lambda tn: (TIERS.index(tn[0]), tn[1].numa != numa, tn[1].ucx_name))
    return scored


def parse_map(spec: str) -> dict[int, tuple[str, ...]]:
    """'0=mlx5_0:1,mlx5_1:1;1=mlx5_2:1' -> {0: (...), 1: (...)}."""
    out: dict[int, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        gpu, _, devs = part.partition("=")
        if not devs:
            raise ValueError(f"rails map entry {part!r}: expected GPU=dev:port[,dev:port]")
        out[int(gpu)] = tuple(d.strip() for d in devs.split(",") if d.strip())
    return out


def select(
    mode: str, nics: list[Nic], *, gpu: int | None, chain: tuple[str, ...] = (), numa: int = -1
) -> RailDecision:
    if mode == "off":
        return RailDecision("off", (), "rails off: UCX chooses")
    if "=" in mode:
        mapping = parse_map(mode)
        devs = mapping.get(gpu if gpu is not None else 0, ())
        return RailDecision("explicit", devs, f"explicit map for GPU {gpu}")
    if mode not in ("auto", "stripe"):
        raise ValueError(f"rails must be auto, stripe, off or a map, not {mode!r}")
    ranked = rank(nics, chain, numa)
    if not ranked:
        return RailDecision(mode, (), "no ACTIVE RDMA port found")
    if gpu is None:  # host memory: every healthy port, none that is down
        return RailDecision(
            mode, tuple(n.ucx_name for _, n in ranked), "host memory: all healthy ports"
        )
    best = ranked[0][0]
    if mode == "auto":
        tied = [n for t, n in ranked if t == best and n.numa == ranked[0][1].numa]
        pick = tied[gpu % len(tied)]
        return RailDecision(mode, (pick.ucx_name,), f"GPU {gpu}: {best} to {pick.ucx_name}")
    local = [n for _, n in ranked if numa < 0 or n.numa == numa] or [n for _, n in ranked]
    return RailDecision(
        mode, tuple(n.ucx_name for n in local), f"GPU {gpu}: stripe over {len(local)} ports"
    )


def apply(
    environ: MutableMapping[str, str],
    mode: str,
    *,
    gpu: int | None,
    sysfs_root: str | Path = "/sys",
    gpu_address: str | None = None,
) -> RailDecision:
    """Decide and assign UCX_NET_DEVICES (removing an inherited value when no port fits)."""
    if mode == "off":
        return select("off", [], gpu=gpu)
    nics = read_nics(sysfs_root)
    chain: tuple[str, ...] = ()
    numa = -1
    if gpu is not None:
        addr = gpu_address or gpu_pci(gpu, sysfs_root)
        if addr:
            dev = Path(sysfs_root) / "bus" / "pci" / "devices" / addr
            chain, numa = pci_chain(dev), _numa(dev)
    decision = select(mode, nics, gpu=gpu, chain=chain, numa=numa)
    if decision.devices:
        environ[ENV] = ",".join(decision.devices)
    elif ENV in environ:
        log.info("rails: dropping inherited %s=%s (%s)", ENV, environ[ENV], decision.reason)
        del environ[ENV]
    log.info(
        "rails %s: %s -> %s", mode, decision.reason, ",".join(decision.devices) or "(UCX default)"
    )
    return decision

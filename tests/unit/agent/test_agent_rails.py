"""UCX rail selection on fake sysfs trees built here (no real NICs needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferry_agent import rails

# Two sockets. Socket 0: root port 00:01.0 -> switch 01:00.0 -> ports 02:00.0 (GPU0),
# 02:01.0 (mlx5_0); a second switch under 00:02.0 holds mlx5_1. Socket 1: GPU1 and mlx5_2.
TOPO = {
    "gpu0": ("pci0000:00", "0000:00:01.0", "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"),
    "mlx5_0": ("pci0000:00", "0000:00:01.0", "0000:01:00.0", "0000:02:01.0", "0000:04:00.0"),
    "mlx5_1": ("pci0000:00", "0000:00:02.0", "0000:05:00.0", "0000:06:00.0", "0000:07:00.0"),
    "gpu1": ("pci0000:80", "0000:80:01.0", "0000:81:00.0", "0000:82:00.0", "0000:83:00.0"),
    "mlx5_2": ("pci0000:80", "0000:80:01.0", "0000:81:00.0", "0000:82:01.0", "0000:84:00.0"),
    "mlx5_3": ("pci0000:80", "0000:80:01.0", "0000:85:00.0"),
}
NUMA = {"pci0000:00": 0, "pci0000:80": 1}


def build_sysfs(
    root: Path, *, down=(), bonded=(), nics=("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3")
) -> Path:
    for name, chain in TOPO.items():
        dev = root / "devices" / Path(*chain)
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "numa_node").write_text(f"{NUMA[chain[0]]}\n")
        addr = chain[-1]
        bus = root / "bus" / "pci" / "devices"
        bus.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(dev, bus), bus / addr)
        if name.startswith("gpu"):
            (dev / "vendor").write_text("0x10de\n")
            (dev / "class").write_text("0x030200\n")
            continue
        if name not in nics:
            continue
        ib = root / "class" / "infiniband" / name
        (ib / "ports" / "1").mkdir(parents=True)
        state = "1: DOWN" if name in down else "4: ACTIVE"
        (ib / "ports" / "1" / "state").write_text(state + "\n")
        os.symlink(os.path.relpath(dev, ib), ib / "device")
        netdev = f"eth_{name}"
        (dev / "net" / netdev).mkdir(parents=True)
        if name in bonded:
            bond = root / "devices" / "virtual" / "net" / "bond0"
            (bond / "bonding").mkdir(parents=True, exist_ok=True)
            net = root / "class" / "net" / netdev
            net.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(bond, net), net / "master")
    return root


GPU0, GPU1 = TOPO["gpu0"][-1], TOPO["gpu1"][-1]


def test_reads_ports_states_and_numa(tmp_path):
    nics = {n.device: n for n in rails.read_nics(build_sysfs(tmp_path, down=("mlx5_1",)))}
    assert nics["mlx5_0"].state == "ACTIVE" and nics["mlx5_0"].numa == 0
    assert nics["mlx5_1"].state == "DOWN" and not nics["mlx5_1"].healthy
    assert nics["mlx5_2"].chain == TOPO["mlx5_2"]


def test_distance_tiers():
    t = TOPO
    assert rails.distance(t["gpu0"], t["mlx5_0"], 0, 0) == "PIX"
    assert rails.distance(t["gpu0"], t["mlx5_1"], 0, 0) == "PHB"
    assert rails.distance(t["gpu1"], t["mlx5_3"], 1, 1) == "PXB"
    assert rails.distance(t["gpu0"], t["mlx5_2"], 0, 1) == "SYS"
    assert rails.distance(("pci0000:00", "x"), ("pci0000:40", "y"), 0, 0) == "NODE"


def test_auto_picks_the_closest_active_nic_per_gpu(tmp_path):
    root = build_sysfs(tmp_path)
    env = {"UCX_NET_DEVICES": "mlx5_9:1"}  # inherited from another component
    d0 = rails.apply(env, "auto", gpu=0, sysfs_root=root, gpu_address=GPU0)
    assert d0.devices == ("mlx5_0:1",) and env["UCX_NET_DEVICES"] == "mlx5_0:1"
    d1 = rails.apply(env, "auto", gpu=1, sysfs_root=root, gpu_address=GPU1)
    assert d1.devices == ("mlx5_2:1",) and env["UCX_NET_DEVICES"] == "mlx5_2:1"


def test_down_and_bonded_ports_are_skipped(tmp_path):
    root = build_sysfs(tmp_path, down=("mlx5_0",), bonded=("mlx5_2",))
    d0 = rails.apply({}, "auto", gpu=0, sysfs_root=root, gpu_address=GPU0)
    assert d0.devices == ("mlx5_1:1",)  # PHB on the same socket beats SYS
    d1 = rails.apply({}, "auto", gpu=1, sysfs_root=root, gpu_address=GPU1)
    assert d1.devices == ("mlx5_3:1",)


def test_same_numa_node_preferred_over_remote_socket(tmp_path):
    root = build_sysfs(tmp_path, nics=("mlx5_1", "mlx5_2"))
    d = rails.apply({}, "auto", gpu=0, sysfs_root=root, gpu_address=GPU0)
    assert d.devices == ("mlx5_1:1",)


def test_stripe_uses_every_healthy_port_on_the_gpus_numa_node(tmp_path):
    root = build_sysfs(tmp_path, down=("mlx5_3",))
    d = rails.apply({}, "stripe", gpu=1, sysfs_root=root, gpu_address=GPU1)
    assert d.devices == ("mlx5_2:1",)
    d = rails.apply({}, "stripe", gpu=0, sysfs_root=root, gpu_address=GPU0)
    assert d.devices == ("mlx5_0:1", "mlx5_1:1")


def test_off_leaves_the_environment_alone(tmp_path):
    env = {"UCX_NET_DEVICES": "mlx5_7:1"}
    rails.apply(env, "off", gpu=0, sysfs_root=build_sysfs(tmp_path), gpu_address=GPU0)
    assert env == {"UCX_NET_DEVICES": "mlx5_7:1"}


def test_explicit_map(tmp_path):
    env: dict[str, str] = {}
    d = rails.apply(env, "0=mlx5_1:1,mlx5_0:1;1=mlx5_3:1", gpu=0, sysfs_root=build_sysfs(tmp_path))
    assert d.mode == "explicit" and env["UCX_NET_DEVICES"] == "mlx5_1:1,mlx5_0:1"
    with pytest.raises(ValueError):
        rails.parse_map("0")


def test_no_rdma_nic_drops_an_inherited_value(tmp_path):
    env = {"UCX_NET_DEVICES": "mlx5_0:1"}
    d = rails.apply(env, "auto", gpu=None, sysfs_root=tmp_path)
    assert d.devices == () and "UCX_NET_DEVICES" not in env


def test_gpu_address_from_sysfs_when_torch_has_no_cuda(tmp_path):
    root = build_sysfs(tmp_path)
    assert rails.gpu_pci(1, root) == GPU1

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ferry_agent.layout import TensorSpec, plan_layout
from ferry_agent.slabs import SHM_DIR, HostSlab, create_slabs
from ferry_agent.views import tensor_views


def test_host_slab_is_shared_memory_seen_by_an_attacher():
    s = HostSlab.create(0, 1 << 16, prefix="ferry-unit")
    try:
        other = HostSlab.attach(0, s.name, s.nbytes)
        s.array[:5] = [1, 2, 3, 4, 5]
        assert other.array[:5].tolist() == [1, 2, 3, 4, 5]
        other.array[-1] = 9
        assert s.array[-1] == 9
        assert s.addr % 4096 == 0 and s.info.memory == "DRAM" and s.info.handle == s.name
        other.close()
        assert os.path.exists(os.path.join(SHM_DIR, s.name))  # attacher never unlinks
    finally:
        s.close()
    assert not os.path.exists(os.path.join(SHM_DIR, s.name))


def test_attach_refuses_path_like_names():
    with pytest.raises(ValueError):
        HostSlab.attach(0, "../etc/passwd", 10)


def test_torch_views_alias_slab_bytes_with_dtype_and_shape():
    specs = [
        TensorSpec("a", "bfloat16", (4, 8)),
        TensorSpec("b", "float32", (3,)),
        TensorSpec("c", "int8", (0,)),
    ]
    lay = plan_layout(specs, 4096)
    slabs = create_slabs(lay.slab_sizes, "host", prefix="ferry-unit")
    try:
        v = tensor_views(slabs, lay.placements)
        assert v["a"].dtype == torch.bfloat16 and tuple(v["a"].shape) == (4, 8)
        v["b"][:] = torch.tensor([1.5, 2.5, 3.5])
        p = lay.by_name()["b"]
        raw = slabs[p.slab].array[p.offset : p.offset + 12].view(np.float32)
        assert raw.tolist() == [1.5, 2.5, 3.5]
        assert v["c"].numel() == 0
    finally:
        for s in slabs:
            s.close()


def test_unknown_memory_mode_refused():
    with pytest.raises(ValueError):
        create_slabs((4096,), "disk", prefix="x")


def test_cuda_array_interface_and_handle_checks_without_a_gpu():
    from ferry_agent.cuda import IPC_HANDLE_BYTES, CudaArray, CudaSlab

    arr = CudaArray(0xDEAD000, 4096, owner=None)
    iface = arr.__cuda_array_interface__
    assert (
        iface["shape"] == (4096,)
        and iface["typestr"] == "|u1"
        and iface["data"] == (0xDEAD000, False)
    )
    with pytest.raises(ValueError, match=f"{IPC_HANDLE_BYTES} bytes"):
        CudaSlab.attach(0, "ab" * 10, 4096, 0)


def test_reap_stale_removes_only_slabs_no_live_process_holds(tmp_path):
    import fcntl
    import subprocess

    from ferry_agent.slabs import reap_stale

    def slab(name: str) -> Path:
        (tmp_path / name).write_bytes(b"x")
        return tmp_path / name

    dead = slab("ferry-pod_r0_aaaa1111_0_aa")  # its creator is gone: nothing holds it
    held = slab("ferry-pod_r1_bbbb2222_0_bb")  # a live creator holds its flock
    other = slab("ferry-other_r0_aaaa1111_0_cc")  # another pod
    dashed = slab("ferry-pod-2_r0_aaaa1111_0_dd")  # pod "pod-2", not pod "pod"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(held),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert reap_stale("ferry-pod", str(tmp_path)) == [dead.name]
        assert {p.name for p in tmp_path.iterdir()} == {held.name, other.name, dashed.name}
    finally:
        holder.kill()
        holder.wait()
    assert reap_stale("ferry-pod", str(tmp_path)) == [held.name]  # its holder died
    del fcntl

"""CUDA slabs and VRAM pulls between agent processes (run on the accelerator machine).

With one GPU both agents share it (two processes); with two or more the source
uses GPU 0 and the target the last one.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from ferry_agent.request import PullRequest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_slab_is_plain_cudamalloc_shared_over_ipc():
    from ferry_agent.cuda import CudaSlab

    slab = CudaSlab.create(0, 64 << 20, device=0)
    try:
        t = slab.tensor()
        assert t.device.type == "cuda" and t.numel() == 64 << 20 and t.data_ptr() == slab.addr
        t[:1024].fill_(7)
        torch.cuda.synchronize()
        code = (
            "import sys, torch; from ferry_agent.cuda import CudaSlab;"
            f"s = CudaSlab.attach(0, '{slab.ipc_handle.hex()}', {slab.nbytes}, 0);"
            "t = s.tensor(); assert int(t[:1024].sum()) == 7 * 1024; t[1024:2048].fill_(9);"
            "torch.cuda.synchronize(); s.close()"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        assert int(t[1024:2048].sum()) == 9 * 1024
    finally:
        slab.close()


@pytest.mark.parametrize(
    ("header_memory", "same_gpu"), [("host", "nixl"), ("slab", "nixl"), ("host", "ipc")]
)
def test_vram_pull_between_agent_processes_bytes_equal(tmp_path, header_memory, same_gpu):
    """Cold pull, then a warm refit of a new version (the one-sided header fence sees
    the new epoch with no RPC), with version headers in host memory or in VRAM. On one
    GPU both agents share it: `--same-gpu ipc` copies through CUDA IPC, `nixl` READs
    over NIXL (what two GPUs always do)."""
    from ferry_agent.client import EngineClient
    from ferry_agent.layout import TensorSpec
    from ferry_agent.peer import AgentClient
    from ferry_dev.procs import spawn_agent

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    last = torch.cuda.device_count() - 1
    common = [
        "--memory",
        "cuda",
        "--slab-bytes",
        "256Mi",
        "--chunk-bytes",
        "64Mi",
        "--header-memory",
        header_memory,
        "--same-gpu",
        same_gpu,
        "--log-level",
        "WARNING",
    ]
    src = spawn_agent(tmp_path, "gsrc", token, args=[*common, "--device", "0"])
    dst = spawn_agent(tmp_path, "gdst", token, args=[*common, "--device", str(last)])
    clients = []
    try:
        specs = [
            TensorSpec(f"w{i}", ["bfloat16", "float32", "int8"][i % 3], (1024, 64 + i))
            for i in range(300)
        ]
        se, de = EngineClient(src.socket), EngineClient(dst.socket)
        clients += [se, de]
        sv, dv = se.declare(specs), de.declare(specs)
        g = torch.Generator(device="cuda:0").manual_seed(0)

        def fill() -> None:
            for t in sv.values():
                t.view(torch.uint8).copy_(
                    torch.randint(
                        0,
                        256,
                        t.view(torch.uint8).shape,
                        generator=g,
                        device="cuda:0",
                        dtype=torch.uint8,
                    )
                )
            torch.cuda.synchronize()

        fill()
        se.publish("g1")
        with AgentClient(dst.endpoint, token.read_text()) as rpc:
            r1 = rpc.pull(PullRequest([src.endpoint], timeout_s=120))
            with se.writing("g2"):
                fill()
            r2 = rpc.pull(PullRequest([src.endpoint], timeout_s=120))
        assert (r1.version, r2.version) == ("g1", "g2")
        ipc = same_gpu == "ipc" and last == 0
        want = "cuda-ipc" if ipc else "nixl"
        assert (r1.transport, r2.transport) == (want, want)
        if not ipc:
            assert r2.dlists_reused == 1 and r2.registrations == 0
        torch.cuda.synchronize()
        for name, t in sv.items():
            assert torch.equal(t.view(torch.uint8), dv[name].view(torch.uint8).to(t.device)), name
        assert r1.descriptors <= 16
    finally:
        for c in clients:
            c.close()
        src.stop()
        dst.stop()
        for p in (src, dst):
            if p.proc.returncode not in (0, None):
                print(p.log())


@pytest.mark.skipif(os.environ.get("FERRY_GPU_BENCH") != "1", reason="set FERRY_GPU_BENCH=1")
def test_bench_transfer_cuda_verifies(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ferry_bench.cli",
            "transfer",
            "--memory",
            "cuda",
            "--bytes",
            "2Gi",
            "--tensors",
            "300",
            "--json",
            "--out",
            str(out),
        ],
        check=True,
        timeout=280,
    )
    import json

    assert json.loads(out.read_text())["verified"] is True

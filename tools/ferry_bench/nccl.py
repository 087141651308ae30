"""NCCL broadcast baseline: the same bytes from one GPU to another, two processes.

Rank 0 (the source GPU) broadcasts to rank 1 (the target GPU) through
torch.distributed, once as one flat bucket and once tensor by tensor (views
into the same bucket, so both move exactly the same bytes). Each variant is
warmed up once, then timed `iters` times; an iteration's time is the slower of
the two ranks (all-reduce MAX), and the median is reported.

Run as a module by the transfer bench:
    python -m ferry_bench.nccl --src 0 --dst 1 --sizes sizes.json --out out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_baseline(
    sizes: list[int], src: int, dst: int, *, iters: int = 5, timeout: float = 300.0
) -> dict[str, Any]:
    """Start the two ranks, wait for them, return {"flat": {...}, "per_tensor": {...}}."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ferry-nccl-") as tmp:
        sizes_path = Path(tmp) / "sizes.json"
        sizes_path.write_text(json.dumps(sizes))
        out = Path(tmp) / "out.json"
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": "2",
            # NVLink SHARP multicast can take a shared host's GPUs down (device KINDS.md).
            "NCCL_NVLS_ENABLE": "0",
        }
        procs = []
        for rank, dev in ((0, src), (1, dst)):
            cmd = [
                sys.executable,
                "-m",
                "ferry_bench.nccl",
                "--rank",
                str(rank),
                "--device",
                str(dev),
                "--sizes",
                str(sizes_path),
                "--iters",
                str(iters),
                "--out",
                str(out),
            ]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
        if any(p.returncode for p in procs) or not out.exists():
            raise RuntimeError(f"NCCL baseline failed: exit codes {[p.returncode for p in procs]}")
        result: dict[str, Any] = json.loads(out.read_text())
        result["name"] = f"NCCL broadcast cuda:{src} -> cuda:{dst} (torch.distributed, 2 processes)"
        return result


def _rank_main(rank: int, device: int, sizes: list[int], iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", rank=rank, world_size=2, device_id=torch.device(f"cuda:{device}")
    )
    total = sum(sizes)
    flat = torch.empty(total, dtype=torch.uint8, device=f"cuda:{device}")
    if rank == 0:
        flat.random_(0, 256)
    views = list(torch.split(flat, sizes))

    def timed(fn: Any) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def flat_bcast() -> None:
        dist.broadcast(flat, src=0)

    def per_tensor() -> None:
        for v in views:
            dist.broadcast(v, src=0)

    result: dict[str, Any] = {}
    for name, fn in (("flat", flat_bcast), ("per_tensor", per_tensor)):
        timed(fn)  # warm-up: communicator, channels, buffers
        times = torch.tensor([timed(fn) for _ in range(iters)], device=f"cuda:{device}")
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        sec = statistics.median(times.tolist())
        result[name] = {
            "GBps": round(total / sec / 1e9, 3),
            "seconds": round(sec, 5),
            "runs_s": [round(t, 5) for t in times.tolist()],
            "broadcasts": 1 if name == "flat" else len(sizes),
        }
    # Same bytes on both ranks? (checksum over the flat bucket)
    digest = torch.tensor(
        [int(flat.view(torch.int32)[: total // 4].sum(dtype=torch.int64))], device=flat.device
    )
    both = [torch.zeros_like(digest) for _ in range(2)]
    dist.all_gather(both, digest)
    result["verified"] = bool(int(both[0]) == int(both[1]))
    if rank == 1:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--device", type=int, required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.environ["RANK"] = str(a.rank)
    _rank_main(a.rank, a.device, json.loads(Path(a.sizes).read_text()), a.iters, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

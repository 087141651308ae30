"""`ferry bench hf-refit`: refit a >= 1 GB HF model through Ferry vs what users do today.

Same run, same model (a real `LlamaForCausalLM` from a config, random weights,
bf16), same machine:

ferry        the trainer (this process) publishes into its agent (copy into the
             slabs); the target agent pulls over NIXL with its engine paused; the
             engine (ferry_dev.hf_replica, its own process, model bound to the
             target's slabs) resumes on the new version. One cold cycle, then warm
             ones; `refit_s` is publish start -> the engine resumed.
safetensors  the trainer saves its state dict to a safetensors file on local disk
             (fsync'd) and the engine's model `load_state_dict`s it back: from the
             page cache (the file just written, the kindest case) and cold (the
             file's pages dropped first with posix_fadvise, this file only).
broadcast    `torch.distributed` broadcast of the state dict, tensor by tensor into
             the target model's parameters, between two processes (gloo on host
             memory, NCCL across two GPUs).

Ratios are baseline seconds / Ferry warm refit seconds (> 1: Ferry is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry_agent.request import PullRequest
from ferry_api import times

# Llama-style shapes (head_dim 128, GQA 4:1, SwiGLU 2.75x): 11 layers of 2048 make
# 1.12 GB in bf16 with the tied 32k embedding.
DEFAULTS = {
    "hidden": 2048,
    "intermediate": 5632,
    "layers": 11,
    "heads": 16,
    "kv_heads": 4,
    "vocab": 32000,
}


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    }


def served_tensors(model: Any) -> dict[str, Any]:
    """The model's tensors as the layout holds them: ties once (safetensors refuses
    tensors that share memory, and the broadcast moves each once)."""
    from ferry_agent.engines.layout import module_layout

    sd = model.state_dict()
    return {e.source: sd[e.source] for e in module_layout(model).entries}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def perturb(model: Any) -> None:
    """A stand-in optimizer step: every weight changes (untimed)."""
    import torch

    with torch.no_grad():
        for t in served_tensors(model).values():
            if t.is_floating_point():
                t.mul_(1.0009765625)


class HfRefitBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config = bench_config(args)
        cuda = args.memory == "cuda"
        if cuda:
            import torch

            last = torch.cuda.device_count() - 1 if args.target_device < 0 else args.target_device
            self.src_dev, self.dst_dev = 0, last
        else:
            self.src_dev = self.dst_dev = 0
        self.src_device = f"cuda:{self.src_dev}" if cuda else "cpu"
        self.dst_device = f"cuda:{self.dst_dev}" if cuda else "cpu"

    # -- Ferry ------------------------------------------------------------------------------
    def run_ferry(self, trainer: Any, workdir: Path) -> dict[str, Any]:
        import torch

        from ferry_agent.client import EngineClient
        from ferry_agent.engines import ModulePublisher
        from ferry_agent.peer import AgentClient
        from ferry_dev.hf_replica import start_replica
        from ferry_dev.procs import spawn_agent

        a = self.args
        token = workdir / "token"
        token.write_text(secrets.token_hex(16))
        common = [
            "--memory",
            a.memory,
            "--slab-bytes",
            "1Gi",
            "--chunk-bytes",
            a.chunk_bytes,
            "--log-level",
            "WARNING",
        ]
        src = spawn_agent(workdir, "hf-src", token, args=[*common, "--device", str(self.src_dev)])
        dst = spawn_agent(workdir, "hf-dst", token, args=[*common, "--device", str(self.dst_dev)])
        client = EngineClient(src.socket, timeout=600)
        replica = None
        cycles = []
        try:
            pub = ModulePublisher(client, trainer)
            replica = start_replica(
                "engine",
                dst.socket,
                self.config,
                workdir / "engine",
                dtype="bfloat16",
                device=self.dst_device,
                new_tokens=0,
            )
            replica.ready(timeout=600)
            with AgentClient(dst.endpoint, token.read_text(), timeout=600) as rpc:
                for k in range(a.cycles + 1):
                    if k:
                        perturb(trainer)
                    version = f"v{k}"
                    t0 = time.time()
                    published = pub.publish(version)
                    t1 = time.time()
                    reply = rpc.pull(PullRequest([src.endpoint], quiesce=True, timeout_s=600))
                    t2 = time.time()
                    rec = replica.served(version, timeout=600)
                    cycles.append(
                        {
                            "version": version,
                            "cold": k == 0,
                            "publish_s": round(t1 - t0, 4),
                            "publish_copy_s": round(published.copy_s, 4),
                            "pull_rpc_s": round(t2 - t1, 4),
                            "pull_total_s": round(reply.total_s, 4),
                            "read_s": round(reply.seconds, 4),
                            "read_gbps": round(reply.gbps, 2),
                            "engine_paused_s": round(rec["resumed_at"] - rec["paused_at"], 4),
                            "refit_s": round(rec["resumed_at"] - t0, 4),
                            "moved": "other slab set" in rec["detail"],
                        }
                    )
            with EngineClient(dst.socket, timeout=600) as d:
                views = d.attach()
                want = served_tensors(trainer)
                verified = all(torch.equal(views[n].to(t.device), t) for n, t in want.items())
        finally:
            if replica is not None:
                replica.stop()
            client.close()
            src.stop()
            dst.stop()
        warm = [c for c in cycles if not c["cold"]]
        return {
            "cold": cycles[0],
            "warm_refit_s": statistics.median(c["refit_s"] for c in warm),
            "warm_publish_s": statistics.median(c["publish_s"] for c in warm),
            "warm_read_s": statistics.median(c["read_s"] for c in warm),
            "cycles": cycles,
            "verified": verified,
            "addresses_kept": not any(c["moved"] for c in cycles),
        }

    # -- safetensors ---------------------------------------------------------------------------
    def run_safetensors(self, trainer: Any, workdir: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file, save_file

        from ferry_agent.engines.hf import model_from_config

        engine = model_from_config(self.config, dtype=torch.bfloat16, device=self.dst_device)
        path = workdir / "model.safetensors"
        runs = []
        for _ in range(self.args.cycles):
            perturb(trainer)
            _sync(self.src_device)
            t0 = time.perf_counter()
            save_file(served_tensors(trainer), str(path))
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            t1 = time.perf_counter()
            engine.load_state_dict(load_file(str(path), device=self.dst_device), strict=False)
            _sync(self.dst_device)
            t2 = time.perf_counter()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
            os.close(fd)
            t3 = time.perf_counter()
            engine.load_state_dict(load_file(str(path), device=self.dst_device), strict=False)
            _sync(self.dst_device)
            t4 = time.perf_counter()
            runs.append({"save_s": t1 - t0, "load_cached_s": t2 - t1, "load_cold_s": t4 - t3})
        want = served_tensors(trainer)
        got = engine.state_dict()
        verified = all(torch.equal(got[n].to(t.device), t) for n, t in want.items())
        size = path.stat().st_size
        path.unlink()
        med = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
        return {
            "file_bytes": size,
            "disk": str(workdir),
            **med,
            "refit_cached_s": round(med["save_s"] + med["load_cached_s"], 4),
            "refit_cold_s": round(med["save_s"] + med["load_cold_s"], 4),
            "verified": verified,
        }

    # -- torch.distributed broadcast ------------------------------------------------------------
    def run_broadcast(self, workdir: Path) -> dict[str, Any]:
        if self.args.memory == "cuda" and self.src_dev == self.dst_dev:
            return {"skipped": "NCCL needs two GPUs (one rank per GPU)"}
        out = workdir / "broadcast.json"
        cfg = workdir / "config.json"
        cfg.write_text(json.dumps(self.config))
        backend = "nccl" if self.args.memory == "cuda" else "gloo"
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "NCCL_NVLS_ENABLE": "0",
        }  # NVLink SHARP multicast: see the device's KINDS.md
        procs = []
        for rank, dev in ((0, self.src_device), (1, self.dst_device)):
            cmd = [
                sys.executable,
                "-m",
                "ferry_bench.hf_refit",
                "--broadcast-rank",
                str(rank),
                "--backend",
                backend,
                "--device",
                dev,
                "--config",
                str(cfg),
                "--iters",
                str(self.args.cycles),
                "--out",
                str(out),
            ]
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            p.wait(1800)
        if any(p.returncode for p in procs):
            raise RuntimeError(f"broadcast baseline failed: {[p.returncode for p in procs]}")
        return {**json.loads(out.read_text()), "devices": f"{self.src_device} -> {self.dst_device}"}

    def run(self) -> dict[str, Any]:
        import torch

        from ferry_agent.engines.hf import model_from_config

        a = self.args
        workdir = Path(tempfile.mkdtemp(prefix="ferry-hf-bench-", dir=a.workdir))
        try:
            t0 = time.perf_counter()
            trainer = model_from_config(
                self.config, dtype=torch.bfloat16, device=self.src_device, seed=1
            )
            build_s = time.perf_counter() - t0
            tensors = served_tensors(trainer)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            ferry = self.run_ferry(trainer, workdir)
            st = self.run_safetensors(trainer, workdir)
            del trainer
            bc = self.run_broadcast(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        warm = ferry["warm_refit_s"]
        ratios = {
            "safetensors_cached_vs_ferry": round(st["refit_cached_s"] / warm, 2),
            "safetensors_cold_vs_ferry": round(st["refit_cold_s"] / warm, 2),
            "safetensors_load_only_cached_vs_ferry": round(st["load_cached_s"] / warm, 2),
        }
        if "seconds" in bc:
            ratios["broadcast_vs_ferry"] = round(bc["seconds"] / warm, 2)
        return {
            "bench": "hf-refit",
            "date": times.stamp(times.now()),
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "cpus": os.cpu_count(),
                "memory": a.memory,
                "gpu": torch.cuda.get_device_name(0) if a.memory == "cuda" else None,
            },
            "model": {
                "class": "LlamaForCausalLM",
                "config": self.config,
                "dtype": "bfloat16",
                "tensors": len(tensors),
                "bytes": nbytes,
                "build_s": round(build_s, 2),
            },
            "devices": {"trainer": self.src_device, "engine": self.dst_device},
            "ferry": ferry,
            "safetensors": st,
            "broadcast": bc,
            "ratios": ratios,
            "verified": ferry["verified"] and st["verified"] and bc.get("verified", True),
        }


# -- one rank of the broadcast baseline ---------------------------------------------------------
def broadcast_rank(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from ferry_agent.engines.hf import model_from_config

    rank = args.broadcast_rank
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)
    dist.init_process_group(args.backend, rank=rank, world_size=2)
    config = json.loads(Path(args.config).read_text())
    model = model_from_config(
        config, dtype=torch.bfloat16, device=args.device, seed=1 if rank == 0 else 2
    )
    tensors = list(served_tensors(model).values())
    times = []
    for it in range(args.iters + 1):  # the first is a warm-up (connections, NCCL channels)
        dist.barrier()
        _sync(args.device)
        t0 = time.perf_counter()
        for t in tensors:
            dist.broadcast(t, src=0)
        _sync(args.device)
        took = torch.tensor(
            [time.perf_counter() - t0],
            dtype=torch.float64,
            device=args.device if args.backend == "nccl" else "cpu",
        )
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if it:
            times.append(float(took.item()))
    # Verify: rank 1 now holds rank 0's weights (a digest of every tensor, compared).
    sums = torch.stack([t.float().sum() for t in tensors]).to(torch.float64)
    ref = sums.clone()
    dist.broadcast(ref, src=0)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "backend": args.backend,
                    "tensors": len(tensors),
                    "bytes": nbytes,
                    "seconds": round(statistics.median(times), 4),
                    "runs_s": [round(x, 4) for x in times],
                    "gbps": round(nbytes / statistics.median(times) / 1e9, 3),
                }
            )
        )
    ok = torch.equal(sums, ref)
    flag = torch.tensor([1 if ok else 0], device=args.device if args.backend == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    if rank == 0:
        data = json.loads(Path(args.out).read_text())
        data["verified"] = bool(flag.item())
        Path(args.out).write_text(json.dumps(data))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hf-refit", help="refit a >= 1 GB HF model: Ferry vs safetensors vs broadcast"
    )
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--memory", choices=("host", "cuda"), default="host")
    p.add_argument(
        "--target-device", type=int, default=-1, help="cuda: GPU of the engine (-1: last)"
    )
    p.add_argument("--cycles", type=int, default=3, help="warm cycles (and baseline runs); medians")
    p.add_argument("--chunk-bytes", default="64Mi")
    p.add_argument("--workdir", default=None, help="local disk for the safetensors file")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.set_defaults(func=cmd_hf_refit)


def cmd_hf_refit(args: argparse.Namespace) -> int:
    from . import emit

    result = HfRefitBench(args).run()
    emit(result, args.out, compact=args.json)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--broadcast-rank", type=int, required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", required=True)
    sys.exit(broadcast_rank(ap.parse_args()))

"""Transfer benchmark: N source agents and one target agent, each its own process.

The bench process plays the engines: it declares the layout through
`ferry_agent.client`, fills the source slabs, publishes, and asks the target
(over gRPC, like the operator would) to pull. Cycle 1 is cold (registration,
manifest, remote agent, prepared lists); later cycles are warm. Before every
cycle the target slabs are zeroed, so each cycle must move every byte, and
the bytes are compared with the source after the first and the last cycle.
The baseline runs in the same process on the same memory: a single-threaded
copy of the same bytes (host), or a torch device-to-device copy (cuda).

`--verify-sweep` then runs warm cycles in each content-check mode (off, sampled, full),
interleaved cycle by cycle so that a busy machine weighs on every mode alike, and
reports each mode's warm cycle against `off` in the same run; `publish_ms` is what the
source's publish (its digests) costs per version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ferry_agent.client import EngineClient
from ferry_agent.layout import ALIGNMENT, DTYPE_SIZES, TensorSpec, align_up
from ferry_agent.peer import AgentClient
from ferry_agent.request import PullRequest
from ferry_dev.procs import AgentProcess, spawn_agent

DTYPES = ("bfloat16", "float32", "float16", "int8", "bfloat16", "float8_e4m3fn")
# Word pattern: a multiplicative hash of the 8-byte word index, so any misplaced byte shows.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def read_transport(log: str) -> str:
    """The UCX protocol chosen for remote reads, from a UCX_PROTO_INFO=y log (e.g. 'cma/memory')."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "remote memory read" not in line:
            continue
        for row in lines[i + 1 : i + 12]:
            cells = [c.strip() for c in row.split("|") if c.strip()]
            if len(cells) >= 3 and (".." in cells[-3] or cells[-3].isdigit()):
                return cells[-1]
    return "unknown"


def read_timings(log: str) -> dict[str, float]:
    """The target agent's start-up (version headers: first CUDA allocation and NIXL
    registration) and declare (slab allocation, slab registration) times, in ms."""
    out: dict[str, float] = {}
    pats = {
        "startup_alloc": r"start-up: version headers (?:\(\w+\) )?allocated in ([0-9.]+) ms",
        "startup_register": r"start-up: .*registered in ([0-9.]+) ms",
        "slab_alloc": r"declared .* allocated in ([0-9.]+) ms",
        "slab_register": r"declared .* registered in ([0-9.]+) ms",
    }
    for key, pat in pats.items():
        m = re.search(pat, log)
        if m:
            out[key] = float(m.group(1))
    return out


def make_specs(total: int, count: int, seed: int = 0) -> list[TensorSpec]:
    """`count` tensors of mixed dtypes and log-normal sizes summing to `total` bytes
    (each a multiple of ALIGNMENT, so they pack without padding)."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, count)
    units = total // ALIGNMENT
    sizes = np.maximum(1, np.floor(weights / weights.sum() * units)).astype(np.int64)
    sizes[int(np.argmax(sizes))] += units - int(sizes.sum())
    specs = []
    for i, s in enumerate(sizes):
        dtype = DTYPES[i % len(DTYPES)]
        n = int(s) * ALIGNMENT // DTYPE_SIZES[dtype]
        shape = (n // 128, 128) if n % 128 == 0 and n >= 128 else (n,)
        specs.append(
            TensorSpec(
                f"layers.{i // 6}.{['wq', 'wk', 'wv', 'wo', 'w1', 'w2'][i % 6]}", dtype, shape
            )
        )
    return specs


class TransferBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = args.memory == "cuda"
        self.procs: list[AgentProcess] = []
        self.clients: list[EngineClient] = []

    # -- memory access from the bench process (host: numpy over shm; cuda: torch over IPC) --
    def _slab_arrays(self, c: EngineClient) -> list[Any]:
        return [s.tensor() if self.cuda else s.array for s in c.slabs]

    def _fill(self, c: EngineClient) -> None:
        for arr in self._slab_arrays(c):
            if self.cuda:
                import torch

                n = arr.numel() // 8
                words = torch.arange(n, dtype=torch.int64, device=arr.device) * int(
                    GOLDEN.astype(np.int64)
                )
                arr[: n * 8].copy_(words.view(torch.uint8))
            else:
                w = arr[: arr.size // 8 * 8].view(np.uint64)
                np.multiply(np.arange(w.size, dtype=np.uint64), GOLDEN, out=w)

    def _zero(self, c: EngineClient) -> None:
        for arr in self._slab_arrays(c):
            arr.fill_(0) if self.cuda else arr.fill(0)
        self._sync()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _verify(self, src: EngineClient, dst: EngineClient) -> bool:
        sa, da = self._slab_arrays(src), self._slab_arrays(dst)
        dp = {p.name: p for p in dst.placements}
        for p in src.placements:
            q = dp[p.name]
            a = sa[p.slab][p.offset : p.offset + p.nbytes]
            b = da[q.slab][q.offset : q.offset + q.nbytes]
            if self.cuda:
                import torch

                if not torch.equal(a, b.to(a.device)):
                    return False
            elif not np.array_equal(a, b):
                return False
        return True

    def _baseline(self, src: EngineClient, dst: EngineClient, total: int) -> dict[str, Any]:
        times = []
        if self.cuda:
            import torch

            a = torch.empty(total, dtype=torch.uint8, device=f"cuda:{self.src_dev}")
            b = torch.empty(total, dtype=torch.uint8, device=f"cuda:{self.dst_dev}")
            b.copy_(a)
            torch.cuda.synchronize()
            for _ in range(3):
                t0 = time.perf_counter()
                b.copy_(a)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            name = f"torch D2D copy cuda:{self.src_dev} -> cuda:{self.dst_dev}"
        else:
            pairs = list(zip(self._slab_arrays(src), self._slab_arrays(dst), strict=True))
            for _ in range(3):
                t0 = time.perf_counter()
                for s, d in pairs:
                    np.copyto(d, s)
                times.append(time.perf_counter() - t0)
            name = "single-process copy (numpy.copyto, 1 thread, same shm slabs)"
        sec = statistics.median(times)
        return {"name": name, "GBps": round(total / sec / 1e9, 3), "seconds": round(sec, 4)}

    def run(self) -> dict[str, Any]:
        a = self.args
        load_before = os.getloadavg()  # shared machines: say how busy it was
        specs = make_specs(a.bytes, a.tensors)
        total = sum(s.nbytes for s in specs)
        slab_bytes = align_up(total + len(specs) * ALIGNMENT, 1 << 20)
        self.src_dev = a.source_device
        self.dst_dev = a.target_device
        if self.cuda and self.dst_dev < 0:
            import torch

            self.dst_dev = max(torch.cuda.device_count() - 1, 0)
        tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
        token = tmp / "token"
        token.write_text(os.urandom(16).hex())
        common = [
            "--memory",
            a.memory,
            "--slab-bytes",
            str(slab_bytes),
            "--chunk-bytes",
            str(a.chunk_bytes),
            "--max-inflight",
            str(a.max_inflight),
            "--nixl-threads",
            str(a.nixl_threads),
            "--rails",
            "off" if not self.cuda else "auto",
            "--lanes",
            str(a.lanes),
            "--post-threads",
            str(a.post_threads),
            "--progress-delay-us",
            str(a.progress_delay_us),
            "--header-memory",
            a.header_memory,
            "--log-level",
            "WARNING",
        ]
        try:
            for k in range(a.sources):
                dev = ["--device", str(self.src_dev + k)] if self.cuda else []
                self.procs.append(spawn_agent(tmp, f"bench-src-{k}", token, args=common + dev))
            tdev = ["--device", str(self.dst_dev)] if self.cuda else []
            # UCX prints the protocol it selects per operation: we report the one used for READs.
            # INFO: the target logs its start-up and declare timings (read back below).
            target = spawn_agent(
                tmp,
                "bench-target",
                token,
                args=[*common, *tdev, "--log-level", "INFO"],
                env={"UCX_PROTO_INFO": "y"},
            )
            self.procs.append(target)
            srcs = [EngineClient(p.socket) for p in self.procs[:-1]]
            dst = EngineClient(target.socket)
            self.clients = [*srcs, dst]
            for c in srcs:
                c.declare(specs)
                self._fill(c)
                self._sync()
                c.publish("bench-0")
            reply = dst.request("declare", tensors=[s.to_dict() for s in specs])
            register_s = float(reply["register_s"])
            dst._map(reply)
            baseline = self._baseline(srcs[0], dst, total)
            rpc = AgentClient(target.endpoint, token.read_text())
            endpoints = [p.endpoint for p in self.procs[:-1]]

            verify = a.verify
            self._zero(dst)
            cold = rpc.pull(PullRequest(endpoints, timeout_s=600, verify=verify))
            verified = self._verify(srcs[0], dst)
            warm, warm_rpc, publish_s = [], [], []
            for i in range(1, a.warm_cycles + 1):
                for c in srcs:
                    c.begin_write()
                    t0 = time.perf_counter()
                    c.publish(f"bench-{i}")
                    publish_s.append(time.perf_counter() - t0)
                self._zero(dst)
                t0 = time.perf_counter()
                warm.append(rpc.pull(PullRequest(endpoints, timeout_s=600, verify=verify)))
                warm_rpc.append(time.perf_counter() - t0)
            verified = verified and self._verify(srcs[0], dst)
            sweep = []
            for cb in a.sweep_chunks or []:
                runs = []
                for i in range(a.warm_cycles + 1):  # +1: the first re-plans for the new chunks
                    for c in srcs:
                        c.begin_write()
                        c.publish(f"sweep-{cb}-{i}")
                    self._zero(dst)
                    runs.append(
                        rpc.pull(
                            PullRequest(endpoints, timeout_s=600, chunk_bytes=cb, verify=verify)
                        )
                    )
                ok = self._verify(srcs[0], dst)
                sweep.append(_summary(runs[1:], total) | {"chunk_bytes": cb, "verified": ok})
            modes = (
                _verify_sweep(self, rpc, srcs, dst, endpoints, total) if a.verify_sweep else None
            )
            rpc.close()
            # The agent says when it copied through CUDA IPC (same GPU); otherwise NIXL
            # moved the bytes and UCX's protocol log names the transport it chose.
            transport = (
                warm[-1].transport
                if warm and warm[-1].transport != "nixl"
                else (read_transport(target.log()))
            )
            timings = read_timings(target.log())
        finally:
            for c in self.clients:
                c.close()
            for p in self.procs:
                p.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        nccl = None
        if self.cuda and a.nccl:
            from .nccl import run_baseline

            # After the agents are gone: the broadcast gets the GPUs to itself.
            nccl = run_baseline([s.nbytes for s in specs], self.src_dev, self.dst_dev)

        summary = _summary(warm, total)
        warm_s, read_s, gbps = summary["warm_s"], summary["warm_read_s"], summary["GBps"]
        extra: dict[str, Any] = {}
        if nccl is not None:
            extra["nccl"] = nccl
            extra["ratio_nccl_flat"] = round(gbps / nccl["flat"]["GBps"], 3)
            extra["ratio_nccl_per_tensor"] = round(gbps / nccl["per_tensor"]["GBps"], 3)
        if sweep:
            extra["sweep"] = sweep
        if modes is not None:
            extra["verify_sweep"] = modes
        return {
            "bench": "transfer",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": _command(),
            "machine": {
                "loadavg_before": list(load_before),
                "loadavg_after": list(os.getloadavg()),
                "hostname": platform.node(),
                "cpu": _cpu_model(),
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "nixl": _nixl_version(),
            },
            "memory": a.memory,
            "bytes": total,
            "tensors": len(specs),
            "sources": a.sources,
            "descriptors": int(cold.descriptors),
            "chunk_bytes": a.chunk_bytes,
            "max_inflight": a.max_inflight,
            "post_threads": a.post_threads,
            "lanes": a.lanes or ("auto"),
            "progress_delay_us": a.progress_delay_us,
            "header_memory": a.header_memory,
            "verify": verify or "default",
            "verified_pieces": int(warm[-1].verified_pieces) if warm else 0,
            "publish_ms": round(1e3 * statistics.median(publish_s), 3) if publish_s else None,
            "register_s": round(register_s, 6),
            "cold_s": round(register_s + cold.total_s, 4),
            "warm_s": warm_s,
            "warm_runs_s": summary["warm_runs_s"],
            "warm_read_s": read_s,
            "read_GBps": summary["read_GBps"],
            "GBps": gbps,
            "warm_overhead_pct": summary["warm_overhead_pct"],
            "warm_phases_ms": summary["warm_phases_ms"],
            "warm_rpc_s": round(statistics.median(warm_rpc), 4),
            "baseline": baseline,
            "ratio": round(gbps / baseline["GBps"], 3),
            "register_ms": round(register_s * 1e3, 3),
            # register_ms is the NIXL registration call of the weight slab(s) on every lane
            # of the target; allocation and the start-up warm-up are reported apart.
            "register_breakdown_ms": timings,
            "verified": bool(verified),
            "transport": transport,
            "warm_registrations": sum(int(r.registrations) for r in warm),
            "warm_dlists_prepared": sum(int(r.dlists_prepared) for r in warm),
            "warm_dlists_reused": sum(int(r.dlists_reused) for r in warm),
            "devices": [self.src_dev, self.dst_dev] if self.cuda else [],
            "gpu": _gpu_name() if self.cuda else "",
        } | extra


VERIFY_MODES = ("off", "sampled", "full")


def _verify_sweep(
    bench: TransferBench,
    rpc: AgentClient,
    srcs: list[EngineClient],
    dst: EngineClient,
    endpoints: list[str],
    total: int,
) -> dict[str, Any]:
    """Warm cycles in each verify mode, interleaved (a new version per pull, target
    zeroed first); each mode's median against `off` measured in the same run."""
    runs: dict[str, list[Any]] = {m: [] for m in VERIFY_MODES}
    ok = True
    for i in range(bench.args.warm_cycles + 1):  # +1: each mode's first pull is dropped
        for mode in VERIFY_MODES:
            for c in srcs:
                c.begin_write()
                c.publish(f"verify-{mode}-{i}")
            bench._zero(dst)
            runs[mode].append(rpc.pull(PullRequest(endpoints, timeout_s=600, verify=mode)))
            ok = ok and bench._verify(srcs[0], dst)
    out: dict[str, Any] = {"verified": ok, "modes": {}}
    off = _summary(runs["off"][1:], total)
    for mode in VERIFY_MODES:
        s = _summary(runs[mode][1:], total)
        verify_ms = 1e3 * statistics.median(r.phases_s.get("verify", 0.0) for r in runs[mode][1:])
        out["modes"][mode] = {
            "warm_s": s["warm_s"],
            "warm_runs_s": s["warm_runs_s"],
            "GBps": s["GBps"],
            "verify_ms": round(verify_ms, 3),
            "verified_pieces": int(runs[mode][-1].verified_pieces),
            "ratio_vs_off": round(s["warm_s"] / off["warm_s"], 3),
            "verify_share_of_pull": round(verify_ms / 1e3 / s["warm_s"], 3),
        }
    return out


def _summary(warm: list[Any], total: int) -> dict[str, Any]:
    """Median warm cycle (agent-side, versions to fence), its READ part, and the rest as a
    percentage of the READs: what a refit costs beyond moving the bytes."""
    warm_s = statistics.median(r.total_s for r in warm)
    read_s = statistics.median(r.seconds for r in warm)
    over = statistics.median((r.total_s - r.seconds) / r.seconds for r in warm if r.seconds > 0)
    return {
        "warm_s": round(warm_s, 5),
        "warm_read_s": round(read_s, 5),
        "warm_runs_s": [round(r.total_s, 5) for r in warm],
        "GBps": round(total / warm_s / 1e9, 3),
        "read_GBps": round(total / read_s / 1e9, 3),
        "warm_overhead_pct": round(100 * over, 2),
        # where a warm cycle's time goes, median per step (ms); `read` is the READs
        "warm_phases_ms": {
            k: round(1e3 * statistics.median(r.phases_s.get(k, 0.0) for r in warm), 4)
            for k in warm[-1].phases_s
        },
        "descriptors": int(warm[-1].descriptors),
    }


def _gpu_name() -> str:
    try:
        import torch

        return str(torch.cuda.get_device_name(0))
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command() -> str:
    argv = sys.argv[1:]
    rest = argv[argv.index("transfer") + 1 :] if "transfer" in argv else argv
    return " ".join(["ferry", "bench", "transfer", *rest])


def _nixl_version() -> str:
    from importlib import metadata

    for dist in ("nixl-cu13", "nixl-cu12", "nixl"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"

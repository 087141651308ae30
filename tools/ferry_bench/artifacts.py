"""Benchmark: pack, fetch over gRPC (server in another process), install.

Baseline, same tree, same run: the `tar` CLI creating and extracting a plain
tar. Ratios are ours / tar in GB/s (above 1 means faster than tar), since
these machines are noisy and shared. All stages read from a warm page cache.

    python -m ferry_bench.artifacts --json [--bytes N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json as jsonlib
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ferry_agent.artifacts.fetch import fetch
from ferry_agent.artifacts.identity import Identity
from ferry_agent.artifacts.install import install
from ferry_agent.artifacts.pack import pack

T = TypeVar("T")

# Share of bytes per file-size class; sizes are typical of Triton/Inductor caches
# (many small cubins and JSON metadata, some MiB-scale kernels, a few big graphs).
MIX = ((0.10, 4 << 10, 64 << 10), (0.30, 256 << 10, 4 << 20), (0.60, 32 << 20, 96 << 20))


def build_tree(root: Path, total: int, seed: int = 1) -> tuple[int, int]:
    """Write about `total` bytes of incompressible files; returns (files, bytes)."""
    rng = random.Random(seed)
    pool = rng.randbytes(64 << 20)
    files = written = 0
    for share, lo, hi in MIX:
        budget = int(total * share)
        while budget > 0:
            size = min(budget, rng.randint(lo, hi))
            d = root / f"{files % 61:02x}" / f"{files % 7}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"k{files}.bin", "wb") as f:
                left, off = size, rng.randrange(len(pool))
                while left:
                    n = min(left, len(pool) - off)
                    f.write(pool[off : off + n])
                    left -= n
                    off = 0
            files += 1
            written += size
            budget -= size
    return files, written


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    # Start every stage with no dirty pages left by the previous one, so
    # writeback throttling does not bill one stage for another's writes.
    os.sync()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _tar(*args: str) -> None:
    subprocess.run(["tar", *args], check=True)


def _machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run(
    bytes_total: int = 1 << 30,
    json: bool = True,
    workdir: str | None = None,
    chunk_size: int = 4 << 20,
    command: str | None = None,
) -> dict:
    """Run every stage once on a fresh tree; returns the report (also printed if `json`)."""
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=workdir))
    server = None
    try:
        tree = tmp / "tree"
        files, nbytes = build_tree(tree, bytes_total)
        gb = nbytes / 1e9

        (tmp / "tar-out").mkdir()
        tar_c, _ = _timed(lambda: _tar("-cf", str(tmp / "base.tar"), "-C", str(tree), "."))
        tar_x, _ = _timed(lambda: _tar("-xf", str(tmp / "base.tar"), "-C", str(tmp / "tar-out")))

        ident = Identity.build("triton", triton="bench", cuda="bench", gpu_arch="sm_90")
        store = tmp / "store"
        store.mkdir()
        t_pack, packed = _timed(
            lambda: pack(tree, store / "bench.part", identity=ident, chunk_size=chunk_size)
        )
        os.replace(packed.path, store / f"{packed.manifest_id}.ferry")

        token = os.urandom(16).hex()
        (tmp / "token").write_text(token)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ferry_agent.artifacts.service",
                "--store",
                str(store),
                "--token-file",
                str(tmp / "token"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"artifact server did not start: {line!r}")
        endpoint = f"127.0.0.1:{int(line.split()[1])}"
        t_fetch, fetched = _timed(lambda: fetch(endpoint, ident, token, tmp / "fetched.ferry"))
        t_install, _ = _timed(
            lambda: install(tmp / "fetched.ferry", tmp / "into", expected_id=fetched.manifest_id)
        )

        def stage(seconds: float) -> dict:
            return {"seconds": round(seconds, 3), "gbps": round(gb / seconds, 3)}

        ours = t_pack + t_fetch + t_install
        report = {
            "benchmark": "artifacts",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command or f"python -m ferry_bench.artifacts --json --bytes {bytes_total}",
            "machine": _machine(),
            "tree": {"files": files, "bytes": nbytes, "chunk_size": chunk_size},
            "stages": {
                "pack": stage(t_pack),
                "fetch_grpc": stage(t_fetch),
                "install": stage(t_install),
                "end_to_end": stage(ours),
            },
            "baseline_tar": {
                "create": stage(tar_c),
                "extract": stage(tar_x),
                "create_plus_extract": stage(tar_c + tar_x),
            },
            "ratios_vs_tar": {
                "pack_vs_create": round(tar_c / t_pack, 3),
                "install_vs_extract": round(tar_x / t_install, 3),
                "end_to_end_vs_create_plus_extract": round((tar_c + tar_x) / ours, 3),
            },
            "notes": "GB = 1e9 bytes of file payload; warm page cache; the gRPC server is a "
            "separate process on loopback; install includes full crc32c + sha256 verification; "
            "tar does no verification and no network hop.",
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    if json:
        print(jsonlib.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON (default)")
    p.add_argument("--bytes", type=int, default=1 << 30, help="tree size (default 1 GiB)")
    p.add_argument("--workdir", default=None, help="where the temp tree goes (default $TMPDIR)")
    p.add_argument("--chunk-size", type=int, default=4 << 20)
    p.add_argument("--out", help="also write the JSON report to this file")
    args = p.parse_args(argv)
    command = "python -m ferry_bench.artifacts " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(
        args.bytes, json=True, workdir=args.workdir, chunk_size=args.chunk_size, command=command
    )
    if args.out:
        Path(args.out).write_text(jsonlib.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

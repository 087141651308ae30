"""Chain benchmark: 1 source -> N targets, relays following their upstream chunk by chunk.

Every agent is its own process (host memory, UCX over loopback). Pulls are paced
with `max_gbps` so a transfer lasts long enough to measure on a small shared
machine. The baseline is measured in the same run: one paced transfer from the
source into a fresh target. The chain starts every link at once (downstream
links are fresh: they adopt the layout from their upstream as soon as it is
declared) and ends when the last link serves the version; store-and-forward
would take N x the baseline. Bytes are compared on every target.

    python -m ferry_bench.chain --mib 96 --gbps 0.05 --targets 3 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ferry_agent.client import EngineClient
from ferry_agent.layout import TensorSpec
from ferry_agent.peer import AgentClient
from ferry_agent.request import PullRequest
from ferry_dev.procs import AgentProcess, spawn_agent

from . import emit


def _fill(c: EngineClient, seed: int) -> str:
    rng = np.random.default_rng(seed)
    for s in c.slabs:
        s.array[:] = rng.integers(0, 256, s.nbytes, dtype=np.uint8)
    return _digest(c)


def _digest(c: EngineClient) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for p in c.placements:
        h.update(c.slabs[p.slab].array[p.offset : p.offset + p.nbytes])
    return h.hexdigest()


def _chain_once(rpcs: list[AgentClient], ups: list[str], gbps: float) -> list[float]:
    """Start every link at once (last first); when each one finished (monotonic)."""
    ends = [0.0] * len(rpcs)
    errors: list[str] = []

    def pull(k: int) -> None:
        try:
            rpcs[k].pull(PullRequest([ups[k]], max_gbps=gbps, timeout_s=600, relay=k > 0))
            ends[k] = time.monotonic()
        except Exception as exc:  # fails the run below
            errors.append(f"link {k}: {exc}")

    threads = [threading.Thread(target=pull, args=(k,)) for k in reversed(range(len(rpcs)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return ends


class Setup(NamedTuple):
    """A work folder with a token, a `mib` MiB weight set (16 bf16 tensors) and the
    `ferry agent run` arguments for agents that move it in `chunk_mib` chunks."""

    work: Path
    token: Path
    specs: list[TensorSpec]
    nbytes: int
    args: list[str]

    @classmethod
    def make(cls, prefix: str, mib: int, chunk_mib: int) -> Setup:
        work = Path(tempfile.mkdtemp(prefix=prefix))
        token = work / "token"
        token.write_text(os.urandom(16).hex())
        specs = [TensorSpec(f"layers.{i}.w", "bfloat16", (mib * 512, 64)) for i in range(16)]
        args = ["--slab-bytes", f"{max(64, mib // 2)}Mi", "--chunk-bytes", f"{chunk_mib}Mi"]
        args += ["--log-level", "WARNING"]
        return cls(work, token, specs, sum(s.nbytes for s in specs), args)


def run(mib: int, gbps: float, targets: int, repeats: int, chunk_mib: int) -> dict[str, Any]:
    work, token, specs, nbytes, args = Setup.make("ferry-chain-", mib, chunk_mib)
    tok = token.read_text()
    procs: list[AgentProcess] = []
    clients: list[Any] = []

    def agent(pod: str) -> AgentProcess:
        p = spawn_agent(work, pod, token, args=args, timeout=60)
        procs.append(p)
        return p

    try:
        src = agent("src")
        se = EngineClient(src.socket)
        clients.append(se)
        se.declare(specs)
        want = _fill(se, 1)
        se.publish("v1")
        singles, chains, per_link = [], [], []
        for r in range(repeats):
            base = AgentClient(agent(f"base{r}").endpoint, tok, timeout=30)
            clients.append(base)
            t0 = time.monotonic()
            base.pull(PullRequest([src.endpoint], max_gbps=gbps, timeout_s=600))
            singles.append(time.monotonic() - t0)

            links = [agent(f"r{r}t{k}") for k in range(targets)]
            rpcs = [AgentClient(p.endpoint, tok, timeout=30) for p in links]
            clients.extend(rpcs)
            ups = [src.endpoint] + [p.endpoint for p in links[:-1]]
            t0 = time.monotonic()
            ends = _chain_once(rpcs, ups, gbps)
            chains.append(max(ends) - t0)
            per_link.append([round(e - t0, 3) for e in ends])
            for p in links:
                c = EngineClient(p.socket)
                clients.append(c)
                c.attach()
                if _digest(c) != want:
                    raise RuntimeError(f"{p.pod} holds different bytes")
        single, chain = statistics.median(singles), statistics.median(chains)
        return {
            "benchmark": "chain-relay",
            "date": dt.date.today().isoformat(),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "memory": "host",
            "command": " ".join(
                [os.path.basename(sys.executable), "-m", "ferry_bench.chain", *sys.argv[1:]]
            ),
            "bytes": nbytes,
            "tensors": len(specs),
            "chunk_bytes": chunk_mib << 20,
            "max_gbps": gbps,
            "targets": targets,
            "repeats": repeats,
            "single_s": [round(x, 3) for x in singles],
            "chain_s": [round(x, 3) for x in chains],
            "chain_link_done_s": per_link,
            "single_median_s": round(single, 3),
            "chain_median_s": round(chain, 3),
            "store_and_forward_estimate_s": round(targets * single, 3),
            "ratio_chain_to_single": round(chain / single, 3),
            "ratio_chain_to_store_and_forward": round(chain / (targets * single), 3),
            "bytes_verified": True,
        }
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.stop(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=96, help="weight set size in MiB")
    ap.add_argument("--gbps", type=float, default=0.05, help="pull pace per link (max_gbps)")
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    out = run(args.mib, args.gbps, args.targets, args.repeats, args.chunk_mib)
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

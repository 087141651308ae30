"""Small-N check of the fan-out model against real multi-target transfers (issue 8).

One source agent and k fresh target agents, each its own process (host memory, UCX
over loopback), for k = 1..4 and each strategy. The schedule comes from the real
planner: this bench stands in for the operator, calling `ferry_operator.planner.plan`
at the start and whenever a target finishes, and asking each assigned target over
gRPC to pull from its upstream(s) (chain links with relay=True). Pulls are paced
(`max_gbps`) so a transfer lasts long enough to measure on a small shared machine.

The model's host parameters are calibrated in the same run from single transfers
only (never from the multi-target runs it is checked against):
- copy bandwidth: one unpaced pull into a fresh agent (bytes / its READ seconds);
- per-pull cost: the median wall time of paced single pulls into fresh agents minus
  the model's data time for them, so the model reproduces k = 1 by construction;
- relay lag: the median time of a RelayStatus call (a caught-up relay long-polls
  its upstream, which answers as soon as a READ lands).
Every pod is its own "node" here (one host, one kind of link).

    python -m ferry_bench.fanout_check --mib 96 --gbps 0.05 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import queue
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ferry_agent.client import EngineClient
from ferry_agent.peer import AgentClient
from ferry_agent.request import PullRequest
from ferry_dev.procs import AgentProcess, spawn_agent
from ferry_operator.planner import plan

from . import emit
from .chain import Setup, _digest, _fill
from .fanout import Params, chunks, fleet, predict


class _Run:
    """Agents of one run; stopped (by this object, each by its own handle) on exit."""

    def __init__(self, work: Path, token: Path, args: list[str]):
        self.work, self.token, self.args = work, token, args
        self.procs: list[AgentProcess] = []
        self.clients: list[Any] = []

    def agent(self, pod: str) -> AgentProcess:
        p = spawn_agent(self.work, pod, self.token, args=self.args, timeout=90)
        self.procs.append(p)
        return p

    def rpc(self, p: AgentProcess) -> AgentClient:
        c = AgentClient(p.endpoint, self.token.read_text(), timeout=30)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.procs:
            p.stop(timeout=10)
        self.clients, self.procs = [], []


def _planned_run(
    strategy: str, k: int, src: AgentProcess, run: _Run, gbps: float, max_fan_out: int, want: str
) -> dict[str, Any]:
    """Targets pulled as the planner says; per-target done times from the first request."""
    sources, targets = fleet(k, 1, gpus_per_node=1)
    agents = {t.pod: run.agent(t.pod) for t in targets}
    endpoint = {sources[0].pod: src.endpoint} | {pod: a.endpoint for pod, a in agents.items()}
    rpcs = {pod: run.rpc(a) for pod, a in agents.items()}
    state = {t.pod: t for t in targets}
    finished: queue.Queue[tuple[str, float, str | None]] = queue.Queue()
    t0 = time.monotonic()

    def pull(pod: str, ups: tuple[str, ...], relay: bool) -> None:
        try:
            rpcs[pod].pull(
                PullRequest([endpoint[u] for u in ups], max_gbps=gbps, timeout_s=600, relay=relay)
            )
            finished.put((pod, time.monotonic() - t0, None))
        except Exception as exc:  # reported below, fails the run
            finished.put((pod, time.monotonic() - t0, f"{pod}: {exc}"))

    done: dict[str, float] = {}
    rounds = 0
    assigned: dict[str, tuple[str, ...]] = {}
    while len(done) < k:
        pl = plan(strategy, sources, list(state.values()), max_fan_out)
        rounds += bool(pl.assign)
        for pod, ups in reversed(sorted(pl.assign.items())):  # downstream links first
            state[pod] = replace(state[pod], phase="Pulling", sources=ups)
            assigned[pod] = ups
            relay = strategy == "chain" and ups[0] != sources[0].pod
            threading.Thread(target=pull, args=(pod, ups, relay), daemon=True).start()
        pod, when, err = finished.get(timeout=900)
        if err:
            raise RuntimeError(err)
        done[pod] = when
        state[pod] = replace(state[pod], phase="Done")
        while strategy == "chain" and len(done) < k:  # chains are planned once
            pod, when, err = finished.get(timeout=900)
            if err:
                raise RuntimeError(err)
            done[pod] = when
    for pod, a in agents.items():
        c = EngineClient(a.socket)
        run.clients.append(c)
        c.attach()
        if _digest(c) != want:
            raise RuntimeError(f"{pod} holds different bytes")
    return {
        "seconds": round(max(done.values()), 4),
        "rounds": rounds,
        "done_s": [round(done[t.pod], 4) for t in targets],
        "upstream": {p: ",".join(u) for p, u in sorted(assigned.items())},
    }


def calibrate(
    nbytes: int,
    chunk: int,
    gbps: float,
    unpaced_read_s: float,
    paced_wall_s: float,
    rpc_s: float,
    max_fan_out: int,
) -> Params:
    """Host parameters from single transfers (see the module docstring)."""
    copy = nbytes / unpaced_read_s / 1e9
    sizes = chunks(nbytes, chunk)
    data = sizes[0] / (copy * 1e9) + (nbytes - sizes[-1]) / (gbps * 1e9)
    return Params(
        nic_GBps=copy,
        nvlink_GBps=copy,
        per_pull_s=max(0.0, paced_wall_s - data),
        per_descriptor_s=0.0,
        relay_lag_s=rpc_s,
        chunk_bytes=chunk,
        max_fan_out=max_fan_out,
        gpus_per_node=1,
        pace_GBps=gbps,
    )


def run(
    mib: int,
    gbps: float,
    ks: list[int],
    chunk_mib: int,
    singles: int,
    max_fan_out: int,
    strategies: list[str],
) -> dict[str, Any]:
    work, token, specs, nbytes, args = Setup.make("ferry-fanout-", mib, chunk_mib)
    load0 = os.getloadavg()
    base = _Run(work, token, args)
    try:
        src = base.agent("src-00")
        se = EngineClient(src.socket)
        base.clients.append(se)
        se.declare(specs)
        want = _fill(se, 1)
        se.publish("v1")
        probe = base.rpc(src)
        rpc = []
        for _ in range(30):
            t = time.perf_counter()
            probe.relay_status()
            rpc.append(time.perf_counter() - t)
        rpc_s = statistics.median(rpc)
        unpaced = base.rpc(base.agent("cal-unpaced")).pull(
            PullRequest([src.endpoint], timeout_s=600)
        )
        walls, reads, totals = [], [], []
        for i in range(singles):
            c = base.rpc(base.agent(f"cal-paced-{i}"))
            t = time.monotonic()
            r = c.pull(PullRequest([src.endpoint], max_gbps=gbps, timeout_s=600))
            walls.append(time.monotonic() - t)
            reads.append(r.seconds)
            totals.append(r.total_s)
        p = calibrate(
            nbytes,
            chunk_mib << 20,
            gbps,
            unpaced.seconds,
            statistics.median(walls),
            rpc_s,
            max_fan_out,
        )
        rows = []
        for strategy in strategies:
            for k in ks:
                one = _Run(work, token, args)
                try:
                    got = _planned_run(strategy, k, src, one, gbps, max_fan_out, want)
                finally:
                    one.close()
                pred = predict(strategy, k, 1, nbytes, p)
                rows.append(
                    {
                        "strategy": strategy,
                        "targets": k,
                        "measured_s": got["seconds"],
                        "predicted_s": round(pred.seconds, 4),
                        "error_pct": round(
                            100 * (pred.seconds - got["seconds"]) / got["seconds"], 1
                        ),
                        "measured_rounds": got["rounds"],
                        "predicted_rounds": pred.rounds,
                        "measured_done_s": got["done_s"],
                        "predicted_done_s": [round(x, 4) for x in pred.done_s],
                        "upstream": got["upstream"],
                    }
                )
        errs = [abs(r["error_pct"]) for r in rows]
        return {
            "benchmark": "fanout-check",
            "date": dt.date.today().isoformat(),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "memory": "host",
            "command": " ".join(
                [
                    os.path.basename(sys.executable),
                    "-m",
                    "ferry_bench.fanout_check",
                    *sys.argv[1:],
                ]
            ),
            "note": "2 shared cores: sizes kept small and every pull paced, so the run measures "
            "scheduling, relay lag and per-pull costs rather than memory bandwidth",
            "bytes": nbytes,
            "chunk_bytes": chunk_mib << 20,
            "max_gbps": gbps,
            "max_fan_out": max_fan_out,
            "calibration": {
                "unpaced_read_s": round(unpaced.seconds, 4),
                "copy_GBps": round(p.nic_GBps, 3),
                "paced_single_wall_s": [round(x, 4) for x in walls],
                "paced_single_read_s": [round(x, 4) for x in reads],
                "paced_single_total_s": [round(x, 4) for x in totals],
                "relay_status_rpc_s": round(rpc_s, 5),
            },
            "params": asdict(p),
            "results": rows,
            "max_abs_error_pct": max(errs),
            "mean_abs_error_pct": round(statistics.mean(errs), 1),
            "bytes_verified": True,
        }
    finally:
        base.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=96, help="weight set size in MiB")
    ap.add_argument("--gbps", type=float, default=0.05, help="pull pace per link (max_gbps)")
    ap.add_argument("--targets", default="1,2,3,4", help="k values, comma separated")
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--singles", type=int, default=3, help="paced single pulls for calibration")
    ap.add_argument(
        "--max-fan-out",
        type=int,
        default=1,
        help="direct/tree: 1 serialises a source, so each k shows its rounds",
    )
    ap.add_argument("--strategies", default="chain,direct,tree")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    out = run(
        a.mib,
        a.gbps,
        [int(x) for x in a.targets.split(",")],
        a.chunk_mib,
        a.singles,
        a.max_fan_out,
        a.strategies.split(","),
    )
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

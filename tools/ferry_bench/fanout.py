"""`ferry bench fanout`: predicted time to refit N GPUs per fan-out strategy (issue 8).

The schedule is the operator's: `ferry_operator.planner.plan` is called on synthetic
pods (8 GPUs per node, one pod per GPU) exactly as the RefitJob handler calls it, at
the start and again whenever a target finishes. What the model adds is time:

- direct / tree: a fluid simulation. Every assigned (target, upstream) pair is a flow
  over NVLink (same node) or the two GPUs' NICs (different nodes). A link's capacity
  is split equally among the flows on it; a flow runs at the least of its shares.
  A pull costs a fixed `per_pull_s` and `per_descriptor_s` per READ descriptor
  before its bytes move.
- chain: the planner's chains are independent (each GPU sends to at most one
  downstream and every GPU has its own NIC), so each chain is timed chunk by chunk:
  a relay link can READ chunk k once its upstream landed it and it noticed
  (`relay_lag_s`: one RelayStatus long-poll answer, see relay.RELAY_WAIT_S), and it
  finishes once its upstream finished and it landed every chunk.

Every parameter and where it came from is in `SOURCES` and in the JSON printed.
Pure functions only; the CLI at the bottom prints one JSON object.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ferry_agent.relay import RELAY_WAIT_S
from ferry_api.refitjob import Strategy
from ferry_operator.planner import Peer, TargetState, plan

from . import emit

STRATEGIES = ("direct", "tree", "chain")
_CRD = Strategy()


@dataclass(frozen=True)
class Params:
    """Everything the model knows about the hardware and the agent (GB = 1e9 bytes)."""

    nic_GBps: float  # payload bandwidth of one GPU's NIC, each direction (full duplex)
    nvlink_GBps: float  # one GPU's NVLink egress, and ingress, within a node
    per_pull_s: float  # a pull's fixed cost besides its READs (plan, fences, publish)
    per_descriptor_s: float  # each READ descriptor's cost on top of its bytes
    relay_lag_s: float  # from an upstream landing a chunk until its relay READs it
    chunk_bytes: int = _CRD.chunk_bytes  # one READ descriptor; what a relay forwards
    max_fan_out: int = _CRD.max_fan_out
    parallel_sources: int = _CRD.parallel_sources
    gpus_per_node: int = 8
    reassign_s: float = 0.0  # a target finished -> its successor's assignment reaches an agent
    pace_GBps: float = 0.0  # max_gbps of every pull (host check only; 0 = unpaced)


# H200 numbers are from the committed GPU benchmarks; the NIC is a stated hardware figure.
NIC_LINE_GBps = 400 / 8  # one 400 Gb/s NIC per GPU (ConnectX-7 class, HGX H100/H200 nodes)
RELAY_RPC_S = 0.0003  # one RelayStatus call, measured on the 2-core VM (relay.py)
NIC_EFFICIENCY = 0.9  # assumed RDMA READ payload share of line rate; no NIC was measured
GPU = Params(
    nic_GBps=NIC_LINE_GBps * NIC_EFFICIENCY,
    nvlink_GBps=389.246,
    per_pull_s=0.02243 - 0.02207,
    per_descriptor_s=3.17e-6,
    relay_lag_s=RELAY_RPC_S,
)
# Before RelayStatus became a long poll (a caught-up relay slept 10 ms between asks).
POLLING_RELAY_LAG_S = 0.01 / 2 + RELAY_RPC_S
SOURCES = {
    "nic_GBps": f"stated: 400 Gb/s per GPU NIC = {NIC_LINE_GBps} GB/s x {NIC_EFFICIENCY} "
    "assumed RDMA READ efficiency (not measured: the lent machines have no NICs between GPUs)",
    "nvlink_GBps": "measured: read_GBps of docs/bench/transfer-cuda-20261122d-h200x2.json "
    "(NIXL READ GPU0->GPU1, H200 NV18, 8 descriptors of 1 GiB); taken as each GPU's "
    "egress/ingress, so several NVLink flows from one GPU share it",
    "per_pull_s": "measured: warm_s - warm_read_s of transfer-cuda-20261122d-h200x2.json "
    "(header fences, plan, publish of a warm refit cycle)",
    "per_descriptor_s": "measured: least-squares slope of warm_read_s over descriptors "
    "(1, 8, 32, 128) in transfer-cuda-20261122-h200x2.json and its chunk sweep",
    "relay_lag_s": "code + measured: one RelayStatus call, 0.3 ms (measured on the 2-core VM); "
    f"a caught-up relay long-polls its upstream (agent/ferry_agent/relay.py, up to "
    f"RELAY_WAIT_S = {RELAY_WAIT_S} s), which answers as soon as a READ lands",
    "chunk_bytes": "CRD default: RefitJob spec.strategy.chunkBytes",
    "max_fan_out": "CRD default: RefitJob spec.strategy.maxFanOut",
    "parallel_sources": "CRD default: RefitJob spec.strategy.parallelSources",
    "gpus_per_node": "stated: 8-GPU nodes, one pod per GPU, each GPU with its own NIC",
    "reassign_s": "0: data plane only; each planner round adds the control plane's "
    "assignment latency (see 'rounds'; ferry bench control-plane measures it)",
    "pace_GBps": "0: unpaced",
}


# -- fleet -----------------------------------------------------------------------------
def fleet(
    n_targets: int, n_sources: int, gpus_per_node: int = 8
) -> tuple[list[Peer], list[TargetState]]:
    """Sources on their own node(s) (the trainer); targets fill nodes in name order."""
    sources = [Peer(f"src-{i:02d}", f"src-node-{i // gpus_per_node}") for i in range(n_sources)]
    targets = [
        TargetState(
            f"n{i // gpus_per_node:04d}-g{i % gpus_per_node}", f"node-{i // gpus_per_node:04d}"
        )
        for i in range(n_targets)
    ]
    return sources, targets


def link_kind(a: str | None, b: str | None) -> str:
    return "nvlink" if a is not None and a == b else "nic"


def chunks(nbytes: int, chunk_bytes: int) -> np.ndarray:
    n = max(1, math.ceil(nbytes / chunk_bytes))
    out = np.full(n, float(chunk_bytes))
    out[-1] = nbytes - chunk_bytes * (n - 1)
    return out


def single_s(nbytes: int, kind: str, p: Params) -> float:
    """One pull of `nbytes` over one idle link: the baseline the strategies are compared to."""
    return float(landings(chunks(nbytes, p.chunk_bytes), kind, p, start=p.per_pull_s)[-1])


# -- chunk timing (chain links, and the single-pull baseline) -------------------------
def landings(
    sizes: np.ndarray,
    kind: str,
    p: Params,
    start: float,
    upstream: np.ndarray | None = None,
) -> np.ndarray:
    """When each chunk lands on one link that can READ from `start`.

    Unpaced, a link copies one chunk after another at its bandwidth. Paced (host
    check), a pull posts chunks `chunk/pace` apart and each lands one copy later;
    a relay is not held to the pace while it follows (each RelayStatus round is a
    new read whose first chunk is posted at once), so it lands each chunk one copy
    after it became visible. With `upstream`, chunk k is visible `relay_lag_s` after
    the upstream landed it:  X[k] = max(visible[k] + copy[k], X[k-1] + gap[k]).
    """
    bw = p.nvlink_GBps if kind == "nvlink" else p.nic_GBps
    copy = sizes / (bw * 1e9) + p.per_descriptor_s
    gap = copy.copy()
    if p.pace_GBps and upstream is None:
        gap = np.concatenate(([copy[0]], sizes[:-1] / (p.pace_GBps * 1e9)))
    visible = np.full(len(sizes), -np.inf) if upstream is None else upstream + p.relay_lag_s
    visible[0] = max(visible[0], start)
    g = np.cumsum(gap) - gap[0]
    return np.maximum.accumulate(visible + copy - g) + g


def chain_done(hops: list[str], nbytes: int, p: Params, setup: float | None = None) -> list[float]:
    """When each link of one chain (hop kinds from the source down) holds every byte.

    Link 0 pulls from the source; link j > 0 starts following once link j-1 is
    pulling (`relay_lag_s` later) and its own setup is done, and is done once it
    landed everything and saw link j-1 done.
    """
    sizes = chunks(nbytes, p.chunk_bytes)
    setup = p.per_pull_s if setup is None else setup
    out: list[float] = []
    up: np.ndarray | None = None
    start = 0.0
    for j, kind in enumerate(hops):
        start = setup if j == 0 else start + p.relay_lag_s + setup
        x = landings(sizes, kind, p, start, up)
        done = float(x[-1]) if j == 0 else max(float(x[-1]), out[-1] + p.relay_lag_s)
        out.append(done)
        up = x
    return out


# -- planner-driven runs ---------------------------------------------------------------
@dataclass
class _Flow:
    target: str
    source: str
    kind: str
    remaining: float
    ready_at: float
    tail_s: float = 0.0
    resources: tuple[tuple[str, str], ...] = ()


@dataclass
class Prediction:
    strategy: str
    targets: int
    sources: int
    bytes: int
    seconds: float
    rounds: int  # planner calls that assigned something (each costs reassign_s)
    links: dict[str, int] = field(default_factory=dict)  # assignments per link kind
    depth: int = 0  # longest path source -> target (chain length, tree depth)
    done_s: list[float] = field(default_factory=list)  # per target, name order


def predict(strategy: str, n_targets: int, n_sources: int, nbytes: int, p: Params) -> Prediction:
    sources, targets = fleet(n_targets, n_sources, p.gpus_per_node)
    if strategy == "chain":
        return _chain(sources, targets, nbytes, p)
    return _fluid(strategy, sources, targets, nbytes, p)


def _depths(assign: dict[str, tuple[str, ...]], sources: list[Peer]) -> dict[str, int]:
    depth = {s.pod: 0 for s in sources}

    def d(pod: str) -> int:
        while pod not in depth:
            up = [pod]
            while up[-1] not in depth:
                up.append(assign[up[-1]][0])
            for q in reversed(up[:-1]):
                depth[q] = depth[assign[q][0]] + 1
        return depth[pod]

    for pod in assign:
        d(pod)
    return depth


def _chain(sources: list[Peer], targets: list[TargetState], nbytes: int, p: Params) -> Prediction:
    pl = plan("chain", sources, targets, p.max_fan_out, p.parallel_sources)
    node = {s.pod: s.node for s in sources} | {t.pod: t.node for t in targets}
    downstream = {ups[0]: pod for pod, ups in pl.assign.items()}
    if len(downstream) != len(pl.assign):
        raise ValueError("a chain upstream feeds two links: chains would share a NIC")
    done: dict[str, float] = {}
    kinds: Counter[str] = Counter()
    depth = 0
    for s in sources:
        links, pod = [], s.pod
        while pod in downstream:
            links.append(downstream[pod])
            pod = downstream[pod]
        hops = [link_kind(node[u], node[d]) for u, d in zip([s.pod, *links], links, strict=False)]
        kinds.update(hops)
        depth = max(depth, len(links))
        done.update(zip(links, chain_done(hops, nbytes, p), strict=False))
    seconds = max(done.values(), default=0.0) + (p.reassign_s if done else 0.0)
    return Prediction(
        "chain",
        len(targets),
        len(sources),
        nbytes,
        seconds,
        1 if done else 0,
        dict(kinds),
        depth,
        [done[t.pod] for t in targets],
    )


def _fluid(
    strategy: str, sources: list[Peer], targets: list[TargetState], nbytes: int, p: Params
) -> Prediction:
    node = {s.pod: s.node for s in sources} | {t.pod: t.node for t in targets}
    state = {t.pod: t for t in targets}
    flows: list[_Flow] = []
    done: dict[str, float] = {}
    all_assign: dict[str, tuple[str, ...]] = {}
    kinds: Counter[str] = Counter()
    t, rounds, replan = 0.0, 0, True
    while True:
        if replan:
            pl = plan(strategy, sources, list(state.values()), p.max_fan_out, p.parallel_sources)
            rounds += bool(pl.assign)
            for pod, ups in pl.assign.items():
                state[pod] = replace(state[pod], phase="Pulling", sources=ups)
                all_assign[pod] = ups
                for up in ups:
                    flows.append(_flow(pod, up, node, nbytes // len(ups), t, p))
                    kinds[flows[-1].kind] += 1
            replan = False
        if not flows:
            break
        active = [f for f in flows if f.ready_at <= t and f.remaining > 0]
        rates = _rates(active, p)
        nxt = [f.ready_at for f in flows if f.ready_at > t]
        nxt += [t + f.remaining / r for f, r in zip(active, rates, strict=True)]
        nxt += [f.ready_at for f in flows if f.remaining <= 0]  # tails running
        t_next = max(t, min(nxt))
        for f, r in zip(active, rates, strict=True):
            f.remaining = (
                0.0
                if t + f.remaining / r <= t_next * (1 + 1e-12)
                else f.remaining - r * (t_next - t)
            )
            if f.remaining <= 0:
                f.ready_at = t_next + f.tail_s  # the last chunk's copy (paced) still to land
        t = t_next
        finished = [f for f in flows if f.remaining <= 0 and f.ready_at <= t]
        flows = [f for f in flows if not (f.remaining <= 0 and f.ready_at <= t)]
        busy = {f.target for f in flows}
        for f in finished:
            if f.target not in busy and f.target not in done:
                done[f.target] = t
                state[f.target] = replace(state[f.target], phase="Done")
                replan = True
    if len(done) < len(targets):
        raise ValueError(f"{len(targets) - len(done)} targets never assigned ({strategy})")
    depth = max(_depths(all_assign, sources).values(), default=0)
    return Prediction(
        strategy,
        len(targets),
        len(sources),
        nbytes,
        max(done.values(), default=0.0),
        rounds,
        dict(kinds),
        depth,
        [done[t.pod] for t in targets],
    )


def _flow(
    target: str, source: str, node: dict[str, str | None], nbytes: int, t: float, p: Params
) -> _Flow:
    kind = link_kind(node[source], node[target])
    res = (
        (("nvl_out", source), ("nvl_in", target))
        if kind == "nvlink"
        else (("nic_out", source), ("nic_in", target))
    )
    sizes = chunks(nbytes, p.chunk_bytes)
    tail = 0.0
    remaining = float(nbytes)
    if p.pace_GBps:  # paced: the last chunk is posted (W - last)/pace in and lands one copy later
        bw = p.nvlink_GBps if kind == "nvlink" else p.nic_GBps
        remaining = float(nbytes - sizes[-1])
        tail = float(sizes[0] / (bw * 1e9))
        remaining = remaining or 1.0
    ready = t + p.reassign_s + p.per_pull_s + len(sizes) * p.per_descriptor_s
    return _Flow(target, source, kind, remaining, ready, tail, res)


def _rates(active: list[_Flow], p: Params) -> list[float]:
    """Bytes/s per flow: each link's capacity split equally among its flows."""
    users = Counter(r for f in active for r in f.resources)
    out = []
    for f in active:
        cap = p.nvlink_GBps if f.kind == "nvlink" else p.nic_GBps
        share = min(cap / users[r] for r in f.resources)
        out.append(1e9 * (min(share, p.pace_GBps) if p.pace_GBps else share))
    return out


# -- the sweep the CLI prints ----------------------------------------------------------
NS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SIZES = (8 * 10**9, 140 * 10**9)  # an 8 GB weight set; 140 GB = a 70B model in bf16


def sweep(
    ns: tuple[int, ...],
    sizes: tuple[int, ...],
    source_counts: tuple[int, ...],
    p: Params,
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "fanout-model",
        "params": asdict(p),
        "param_sources": SOURCES,
        "placement": f"sources on their own node(s); targets fill {p.gpus_per_node}-GPU nodes "
        "in name order (n0000-g0 .. n0000-g7, n0001-g0, ...); one pod per GPU",
        "bytes_mean": "bytes each target pod receives (its whole weight set)",
        "scenarios": [],
    }
    for nbytes in sizes:
        for s in source_counts:
            sc: dict[str, Any] = {
                "bytes": nbytes,
                "sources": s,
                "single_nic_s": round(single_s(nbytes, "nic", p), 6),
                "strategies": {},
            }
            for strategy in strategies:
                rows = []
                for n in ns:
                    r = predict(strategy, n, s, nbytes, p)
                    rows.append(
                        {
                            "targets": n,
                            "seconds": round(r.seconds, 6),
                            "vs_single": round(r.seconds / sc["single_nic_s"], 3),
                            "rounds": r.rounds,
                            "depth": r.depth,
                            "links": r.links,
                        }
                    )
                sc["strategies"][strategy] = rows
            out["scenarios"].append(sc)
    return out


def register(sub: Any) -> None:
    f = sub.add_parser("fanout", help="predicted refit time for N GPUs per strategy (model)")
    f.add_argument("--targets", type=lambda v: tuple(int(x) for x in v.split(",")), default=NS)
    f.add_argument(
        "--gb",
        type=lambda v: tuple(int(float(x) * 1e9) for x in v.split(",")),
        default=SIZES,
        help="weight set per target in GB (1e9), comma separated",
    )
    f.add_argument("--sources", type=lambda v: tuple(int(x) for x in v.split(",")), default=(1, 8))
    f.add_argument("--max-fan-out", type=int, default=GPU.max_fan_out)
    f.add_argument("--chunk-bytes", type=int, default=GPU.chunk_bytes)
    f.add_argument("--reassign-s", type=float, default=GPU.reassign_s)
    f.add_argument("--relay-lag-s", type=float, default=GPU.relay_lag_s)
    f.add_argument("--json", action="store_true", help="print compact JSON")
    f.add_argument("--out", help="also write the JSON object to this file")
    f.set_defaults(func=cmd_fanout)


def cmd_fanout(args: argparse.Namespace) -> int:
    p = replace(
        GPU,
        max_fan_out=args.max_fan_out,
        chunk_bytes=args.chunk_bytes,
        reassign_s=args.reassign_s,
        relay_lag_s=args.relay_lag_s,
    )
    result = sweep(args.targets, args.gb, args.sources, p)
    # For comparison: the relay before RelayStatus became a long poll (it slept
    # 10 ms between asks once caught up, so each link lagged ~5 ms more).
    slow = replace(p, relay_lag_s=POLLING_RELAY_LAG_S)
    result["polling_relay_for_comparison"] = {
        "relay_lag_s": slow.relay_lag_s,
        "scenarios": sweep(args.targets, args.gb, args.sources, slow, ("chain",))["scenarios"],
    }
    emit(result, args.out, compact=args.json)
    return 0

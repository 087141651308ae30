"""`ferry bench transfer`: source and target agents as separate processes, one JSON object out."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from ferry_agent.cli import parse_size

from . import emit

# Benchmarks that live in their own modules, each exposing `register(sub)`.
MORE_BENCHES = (
    "ferry_bench.fanout",
    "ferry_bench.control_plane",
    "ferry_bench.hf_refit",
    "ferry_bench.refit_loop",
    "ferry_bench.reconcile_cost",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (JSON out)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    t = sub.add_parser(
        "transfer", help="pull a weight set between agent processes; compare to a copy"
    )
    t.add_argument("--bytes", type=parse_size, default=parse_size("1Gi"))
    t.add_argument("--tensors", type=int, default=300)
    t.add_argument("--memory", choices=("host", "cuda"), default="host")
    t.add_argument("--sources", type=int, default=1)
    t.add_argument("--chunk-bytes", type=parse_size, default=parse_size("64Mi"))
    t.add_argument("--max-inflight", type=int, default=32)
    t.add_argument("--nixl-threads", type=int, default=0)
    t.add_argument("--post-threads", type=int, default=1)
    t.add_argument("--lanes", type=int, default=0, help="target NIXL agents (0: agent default)")
    t.add_argument("--progress-delay-us", type=int, default=1000)
    t.add_argument(
        "--header-memory", choices=("host", "slab"), default="host", help="agents' version headers"
    )
    t.add_argument("--warm-cycles", type=int, default=5, help="warm cycles; warm_s is their median")
    t.add_argument("--source-device", type=int, default=0, help="cuda: GPU of the first source")
    t.add_argument(
        "--target-device", type=int, default=-1, help="cuda: GPU of the target (-1: last)"
    )
    t.add_argument(
        "--nccl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuda: also time NCCL broadcast of the same bytes (flat and per tensor)",
    )
    t.add_argument(
        "--sweep-chunks",
        type=lambda v: [parse_size(x) for x in v.split(",") if x],
        default=[],
        help="after the main run, warm cycles at each of these chunk sizes (e.g. 256Mi,1Gi)",
    )
    t.add_argument(
        "--verify",
        choices=("off", "sampled", "full"),
        default=None,
        help="content check of every pull (default: the agent's, sampled)",
    )
    t.add_argument(
        "--verify-sweep",
        action="store_true",
        help="after the main run, warm cycles in each verify mode (interleaved); ratios vs off",
    )
    t.add_argument("--json", action="store_true", help="print only the JSON object")
    t.add_argument("--out", help="also write the JSON object to this file")
    t.set_defaults(func=cmd_transfer)
    a = sub.add_parser(
        "artifacts",
        help="pack, fetch over gRPC between two agents, install a JIT cache tree; compare to tar",
    )
    a.add_argument("--bytes", type=parse_size, default=parse_size("1Gi"), help="tree size")
    a.add_argument("--workdir", default=None, help="where the temporary tree goes")
    a.add_argument("--json", action="store_true", help="print only the JSON object")
    a.add_argument("--out", help="also write the JSON object to this file")
    a.set_defaults(func=cmd_artifacts)
    for module in MORE_BENCHES:
        importlib.import_module(module).register(sub)


def cmd_transfer(args: argparse.Namespace) -> int:
    from .transfer import TransferBench

    result = TransferBench(args).run()
    emit(result, args.out, compact=args.json)
    return 0 if result.get("verified") else 1


def cmd_artifacts(args: argparse.Namespace) -> int:
    from . import artifacts as bench

    argv = ["--bytes", str(args.bytes)] + (["--workdir", args.workdir] if args.workdir else [])
    argv += ["--out", args.out] if args.out else []
    return bench.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

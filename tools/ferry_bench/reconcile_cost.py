"""`ferry bench reconcile`: the CPU cost of one RefitJob reconcile's pure part at N targets.

What `reconcile.refitjob_` computes between its reads and its writes, with no
cluster: `refitjob.compute_status` over a World of N target pods and 8 source
replicas, the status in wire form and its comparison with the stored one (the
no-op skip), and every target's Lease assignment encoded. Three states of a job:

- `assign`: the first reconcile; no entries yet, every target is assigned;
- `running`: the timer's reconcile of a job in flight (every second while it runs):
  every target has its attempt and a Pulling report with bytes;
- `complete`: every target reported Done; the job finishes.

Each tree in `--tree` (a checkout's root; default: this one) is measured in its own
subprocess that imports `ferry_operator` and `ferry_api` from that tree, so an older
commit is the baseline of the same run; the trees take turns (`--rounds`), so the
load of a shared machine falls on each alike. `median_ms` is the median of
`--repeat` timed runs per state (each round after one warm-up run).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2]
SOURCES = 8
WEIGHT_BYTES = 16 << 30
STATES = ("assign", "running", "complete")


def _world(refitjob: Any, n: int, now: datetime, reports: dict[str, Any]) -> Any:
    pods = [f"inference-{i:04d}" for i in range(n)]
    members = [
        {
            "pod": f"trainer-{i}",
            "node": f"node-{i}",
            "endpoint": f"10.0.0.{i}:50051",
            "state": "Ready",
            "version": "7",
            "fingerprint": "sha256:" + "f" * 64,
            "bytes": WEIGHT_BYTES,
            "tensors": 300,
        }
        for i in range(SOURCES)
    ]
    source = {
        "metadata": {"name": "policy"},
        "spec": {"model": {"name": "m"}, "selector": {"matchLabels": {"app": "trainer"}}},
        "status": {
            "version": "7",
            "fingerprint": "sha256:" + "f" * 64,
            "bytes": WEIGHT_BYTES,
            "tensors": 300,
            "members": members,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "ReplicasReady",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        },
    }
    live = set(pods) | {m["pod"] for m in members}
    return refitjob.World(
        source=source,
        targets={p: f"node-{i % 125}" for i, p in enumerate(pods)},
        live=live,
        now=now,
        reports=reports,
    )


def _leases(modules: Any, reports: dict[str, dict[str, Any]]) -> Any:
    """The agent Leases as the operator lists them: each report as its annotation's text."""
    kube, leases = modules.kube, modules.leases
    ann = {p: {leases.REPORT + UID: leases.encode(r)} for p, r in reports.items()}
    return kube.AgentLeases(live=set(reports), expired=set(), annotations=ann)


def _reconcile(
    m: Any, spec: Any, status: dict[str, Any], n: int, now: datetime, agents: Any
) -> dict[str, Any]:
    """reconcile.refitjob_ between its reads and its writes: the reports decoded from the
    Leases, the decision, its status in wire form compared with the stored one (the
    sole writer's no-op skip) and every assignment encoded. Trees before decide_job
    (the baseline commits) ran the same steps inline in refitjob_; this is that code."""
    world = _world(m.refitjob, n, now, m.reconcile._reports(agents, UID))
    if hasattr(m.reconcile, "decide_job"):
        new = m.reconcile.decide_job("job", spec, status, 1, world).status
    else:
        d = m.refitjob.compute_status(spec, status, 1, world)
        new = d.status
        _ = {pod: a.encode() for pod, a in m.refitjob.assignments("job", spec, new).items()}
    _ = new != status
    return dict(new)


UID = "0b8e9a52-5d0c-4b9e-9f4e-2a7c1d3e4f50"


def child(n: int, repeat: int, profile: int) -> dict[str, Any]:
    """Measure in this process (its sys.path picks the tree)."""
    import types

    from ferry_api import leases
    from ferry_api.refitjob import RefitJobSpec
    from ferry_operator import kube, reconcile
    from ferry_operator.handlers import refitjob

    m = types.SimpleNamespace(leases=leases, kube=kube, reconcile=reconcile, refitjob=refitjob)
    spec = RefitJobSpec.model_validate(
        {
            "sourceRef": {"name": "policy"},
            "targets": {"matchLabels": {"app": "inference"}},
            "strategy": {"maxFanOut": 64},
        }
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    first = _reconcile(m, spec, {}, n, now, _leases(m, {}))
    # Let every assigned target pull, round after round, until all hold an attempt.
    status = first
    for _ in range(64):
        entries = status.get("targets") or []
        if len(entries) >= n and all(e.get("attempts") for e in entries):
            break
        pulled = {
            e["pod"]: {
                "attempt": e["attempts"],
                "phase": "Done",
                "bytes": WEIGHT_BYTES,
                "seconds": 1.0,
            }
            for e in entries
            if e.get("attempts")
        }
        status = _reconcile(m, spec, status, n, now, _leases(m, pulled))
    entries = {e["pod"]: e for e in status.get("targets") or []}
    # `running`: every target in flight on its attempt, each reporting Pulling.
    in_flight = {
        **first,
        "targets": [
            {k: v for k, v in e.items() if k not in ("phase", "bytes", "seconds")}
            for e in status.get("targets") or []
        ],
    }
    pulling = {
        p: {
            "attempt": e["attempts"],
            "phase": "Pulling",
            "bytes": WEIGHT_BYTES // 2,
            "endpoint": f"10.1.{i // 250}.{i % 250}:50051",
        }
        for i, (p, e) in enumerate(sorted(entries.items()))
    }
    done = {
        p: {"attempt": e["attempts"], "phase": "Done", "bytes": WEIGHT_BYTES, "seconds": 1.5}
        for p, e in entries.items()
    }
    later = now + timedelta(seconds=5)
    cases = {
        "assign": ({}, {}),
        "running": (in_flight, pulling),
        "complete": (in_flight, done),
    }
    out: dict[str, Any] = {}
    for name, (st, reports) in cases.items():
        agents = _leases(m, reports)
        result = _reconcile(m, spec, st, n, later, agents)  # warm-up
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            _reconcile(m, spec, st, n, later, agents)
            times.append((time.perf_counter() - started) * 1e3)
        out[name] = {
            "times_ms": [round(t, 3) for t in times],
            "phase": result.get("phase"),
            "targets": len(result.get("targets") or []),
            "status_bytes": len(json.dumps(result, separators=(",", ":"))),
        }
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            _reconcile(m, spec, st, n, later, agents)
            prof.disable()
            stats = pstats.Stats(prof)
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:profile]  # type: ignore[attr-defined]
            out[name]["profile_cumulative_ms"] = [
                {"function": f"{Path(f).name}:{line}:{fn}", "calls": nc, "ms": round(ct * 1e3, 2)}
                for (f, line, fn), (_, nc, _, ct, _) in rows
            ]
    return out


def measure(tree: Path, n: int, repeat: int, profile: int) -> dict[str, Any]:
    """`child` in a subprocess importing the operator and API from `tree`."""
    path = (
        os.pathsep.join(str(tree / d) for d in ("operator", "crds", "agent"))
        + os.pathsep
        + str(HERE / "tools")
    )
    env = {**os.environ, "PYTHONPATH": path}
    code = (
        "import json, sys; from ferry_bench.reconcile_cost import child; "
        f"print(json.dumps(child({n}, {repeat}, {profile})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{tree}: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(tree: Path) -> str:
    got = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return got.stdout.strip() or "unknown"


def run(args: argparse.Namespace) -> int:
    from . import emit

    trees = [Path(t).resolve() for t in args.tree] or [HERE]
    labels = args.label or [str(t) for t in trees]
    result: dict[str, Any] = {
        "bench": "reconcile",
        "targets": args.targets,
        "sources": SOURCES,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "runs": {},
    }
    # Rounds interleave the trees, so a change in the machine's load (it is shared) falls
    # on every tree alike.
    per_round = max(1, args.repeat // args.rounds)
    for r in range(args.rounds):
        for label, tree in zip(labels, trees, strict=False):
            got = measure(tree, args.targets, per_round, args.profile if r == 0 else 0)
            run_ = result["runs"].setdefault(label, {"tree": str(tree), "commit": _commit(tree)})
            for state, m in got.items():
                into = run_.setdefault(
                    state, {k: v for k, v in m.items() if k != "times_ms"} | {"times_ms": []}
                )
                into["times_ms"] += m["times_ms"]
    for run_ in result["runs"].values():
        for state in STATES:
            times = run_[state]["times_ms"]
            run_[state].update(
                median_ms=round(statistics.median(times), 2), min_ms=round(min(times), 2)
            )
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if len(trees) > 1:
        base, *others = labels
        result["ratio_vs_" + base] = {
            other: {
                s: round(
                    result["runs"][other][s]["median_ms"] / result["runs"][base][s]["median_ms"], 2
                )
                for s in STATES
            }
            for other in others
        }
    emit(result, args.out, compact=args.json)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reconcile", help="CPU cost of one RefitJob reconcile (pure part) at N targets"
    )
    p.add_argument("--targets", type=int, default=1000)
    p.add_argument(
        "--repeat", type=int, default=30, help="timed runs per state; median_ms is their median"
    )
    p.add_argument("--rounds", type=int, default=3, help="the trees take turns this many times")
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        help="a checkout to measure (repeatable; the first is the baseline; default: this one)",
    )
    p.add_argument("--label", action="append", default=[], help="a name for each --tree, in order")
    p.add_argument(
        "--profile", type=int, default=0, help="also list the N functions with most cumulative time"
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.set_defaults(func=run)

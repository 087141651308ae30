"""`ferry bench refit-loop`: an RL trainer's refit step, publish -> all N targets serving.

On the local cluster (`ferry_dev.cluster.DevCluster`: real etcd, kube-apiserver,
operator and agent processes, host memory, UCX over loopback), 1 source and N
targets, for each N, in the same run and the same cluster:

- `oneshot`: the trainer publishes version k, then a RefitJob for k is created and
  polled (every 10 ms) until it is Succeeded: `total_s` is create -> Succeeded; the
  data time is the slowest target's pull (`status.targets[].seconds`, the agent's
  own measure of its pull), the control time the rest.
- `follow`: one RefitJob `version: follow` set up once; per step the trainer calls
  `publish_and_wait(k)`: `total_s` is publish -> every target reported k to the
  source; the data time is the slowest target's notice -> served (its pull), the
  control time the rest (the notice, the report, the wait's wake-up).

Each mode's numbers are medians over `--steps` warm steps (after `--warmup`). Bytes
are verified on every target at the end of each mode.

    ferry bench refit-loop --targets 1,3,8 --steps 5 --out docs/bench/refit-loop-....json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferry_agent.client import EngineClient
from ferry_agent.layout import DTYPE_SIZES
from ferry_dev.cluster import DevCluster, digest, fill

from . import emit
from .refit_trace import Tracer

GROUP, VERSION = "ferry.dev", "v1alpha1"
POLL_S = 0.01


def _layout(tensors: int, nbytes: int) -> list[dict[str, Any]]:
    per = nbytes // tensors // 2  # bf16 elements
    return [
        {"name": f"layers.{i}.weight", "dtype": "bfloat16", "shape": [per]} for i in range(tensors)
    ]


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4) if xs else float("nan")


def _summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "total_s": _median([s["total_s"] for s in steps]),
        "data_s": _median([s["data_s"] for s in steps]),
        "control_s": _median([s["total_s"] - s["data_s"] for s in steps]),
        "steps": steps,
    }
    traces = [s["trace"] for s in steps if "trace" in s]
    if traces:  # the median step's timeline, phase by phase (refit_trace.py)
        keys = [k for k in traces[0] if all(k in t for t in traces)]
        out["trace_median_s"] = {k: _median([t[k] for t in traces]) for k in keys}
    return out


class Loop:
    def __init__(self, c: DevCluster, layout: list[dict[str, Any]], trace: bool = False):
        from kubernetes import client as k8s

        self.c = c
        self.tracer = Tracer(c.api(), c.namespace).start() if trace else None
        self.api = k8s.CustomObjectsApi(c.api())
        self.trainer = EngineClient.connect(c.agents["trainer-0"].socket, timeout=120)
        self.views = self.trainer.declare(
            {t["name"]: (t["dtype"], tuple(t["shape"])) for t in layout}
        )
        self.k = 0

    def _obj(self, plural: str, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.c.namespace, plural, name)

    def _create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(
            GROUP, VERSION, self.c.namespace, plural, body
        )

    def _write(self) -> str:
        self.k += 1
        self.trainer.begin_write()
        fill(self.views, self.k)
        return str(self.k)

    def source(self) -> None:
        self._create(
            "weightsources",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "WeightSource",
                "metadata": {"name": "policy"},
                "spec": {
                    "model": {"name": "bench"},
                    "selector": {"matchLabels": {"app": "trainer"}},
                    "memory": "host",
                    "heartbeat": {"leaseDurationSeconds": 15, "renewIntervalSeconds": 2},
                },
            },
        )
        v = self._write()
        self.trainer.publish(v)
        self._until(
            lambda: (self._obj("weightsources", "policy").get("status") or {}).get("version") == v,
            60,
        )

    def _until(self, fn: Any, timeout: float) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if out := fn():
                return out
            time.sleep(POLL_S)
        raise TimeoutError("benchmark step did not finish")

    def _job(self, name: str, version: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RefitJob",
            "metadata": {"name": name},
            "spec": {
                "sourceRef": {"name": "policy"},
                "version": version,
                "timeoutSeconds": 120,
                "targets": {"matchLabels": {"app": "inference"}},
                "pause": {"mode": "none"},
                "ttlSecondsAfterFinished": 30,
            },
        }

    def oneshot_step(self) -> dict[str, float]:
        v = self._write()
        self.trainer.publish(v)
        name = f"step-{v}"
        t0 = time.perf_counter()
        uid = self._create("refitjobs", self._job(name, v))["metadata"]["uid"]
        created = time.perf_counter()
        job = self._until(
            lambda: (
                (o := self._obj("refitjobs", name)).get("status", {}).get("phase")
                in ("Succeeded", "Failed")
                and o
            ),
            120,
        )
        seen = time.perf_counter()
        total = seen - t0
        if job["status"]["phase"] != "Succeeded":
            raise RuntimeError(f"{name} failed: {job['status']}")
        data = max(e.get("seconds") or 0.0 for e in job["status"]["targets"])
        out: dict[str, Any] = {"total_s": round(total, 4), "data_s": round(data, 4)}
        if self.tracer is not None:
            out["trace"] = {
                "created": round(created - t0, 4),
                **self.tracer.timeline(name, uid, t0, seen),
            }
        return out

    def start_follow(self, n: int) -> None:
        self._create("refitjobs", self._job("follow", "follow"))
        self._until(lambda: len(self.trainer.followers()["followers"]) == n, 120)

    def follow_step(self) -> dict[str, float]:
        v = self._write()
        t0 = time.perf_counter()
        res = self.trainer.publish_and_wait(v, timeout=60)
        total = time.perf_counter() - t0
        if not res.ok:
            raise RuntimeError(f"publish_and_wait {v}: {res.failed}")
        data = max(t.seconds for t in res.targets.values())
        return {"total_s": round(total, 4), "data_s": round(data, 4)}

    def verified(self) -> bool:
        want = digest(self.views)
        return all(
            self.c.weights_digest(p) == want for p, a in self.c.agents.items() if a.role == "target"
        )


@contextlib.contextmanager
def _checkout(path: str | None) -> Iterator[None]:
    """Processes started inside (operator, agents) import another checkout's packages
    first (PYTHONPATH): a baseline in the same run."""
    if not path:
        yield
        return
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        str(Path(path) / d) for d in ("operator", "crds", "agent")
    )
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def run_one(
    n: int,
    args: argparse.Namespace,
    layout: list[dict[str, Any]],
    workdir: Path,
    modes: list[str],
    checkout: str | None = None,
) -> dict[str, Any]:
    c = DevCluster(
        workdir / f"n{n}{'-baseline' if checkout else ''}",
        targets=n,
        lease_seconds=15,
        renew_seconds=2.0,
    )
    with _checkout(checkout):
        c.up()
    try:
        loop = Loop(c, layout, trace=args.trace)
        loop.source()
        out: dict[str, Any] = {"targets": n}
        if "oneshot" in modes:
            one = [loop.oneshot_step() for _ in range(args.warmup + args.steps)][args.warmup :]
            out["oneshot"] = {**_summary(one), "verified": loop.verified()}
        if "follow" in modes:
            loop.start_follow(n)
            fol = [loop.follow_step() for _ in range(args.warmup + args.steps)][args.warmup :]
            out["follow"] = {**_summary(fol), "verified": loop.verified()}
        loop.trainer.close()
        if loop.tracer is not None:
            loop.tracer.stop()
        return out
    finally:
        c.down()


def run_n(
    n: int, args: argparse.Namespace, layout: list[dict[str, Any]], workdir: Path
) -> dict[str, Any]:
    """One N: the baseline checkout's one-shot steps first (when given), then this one's."""
    modes = args.modes.split(",")
    base = (
        run_one(n, args, layout, workdir, ["oneshot"], args.baseline_path)
        if args.baseline_path
        else None
    )
    out = run_one(n, args, layout, workdir, modes)
    if base is not None:
        out["baseline"] = base["oneshot"]
        if "oneshot" in out:
            out["oneshot_vs_baseline"] = round(
                out["oneshot"]["total_s"] / base["oneshot"]["total_s"], 3
            )
    return out


def run(args: argparse.Namespace) -> int:
    layout = _layout(args.tensors, args.bytes)
    nbytes = sum(DTYPE_SIZES[t["dtype"]] * math.prod(t["shape"]) for t in layout)
    result: dict[str, Any] = {
        "bench": "refit-loop",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "note": args.note},
        "bytes": nbytes,
        "tensors": args.tensors,
        "memory": "host",
        "steps": args.steps,
        "warmup": args.warmup,
        "baseline_path": args.baseline_path,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="ferry-refit-loop-") as tmp:
        for n in [int(x) for x in args.targets.split(",") if x]:
            result["runs"].append(run_n(n, args, layout, Path(tmp)))
    emit(result, args.out, compact=args.json)
    modes = ("oneshot", "follow", "baseline")
    return 0 if all(r[k]["verified"] for r in result["runs"] for k in modes if k in r) else 1


def register(sub: Any) -> None:
    from ferry_agent.cli import parse_size

    p = sub.add_parser(
        "refit-loop", help="publish -> N targets serving: RefitJob per step vs version: follow"
    )
    p.add_argument("--targets", default="1,3,8", help="comma-separated target counts")
    p.add_argument("--bytes", type=parse_size, default=parse_size("16Mi"))
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="warm steps per mode (medians)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--note", default="", help="where it ran (e.g. 2 cores shared by 7 engineers)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="one-shot steps: when each phase was seen on the watches (refit_trace.py)",
    )
    p.add_argument("--modes", default="oneshot,follow", help="which modes to run")
    p.add_argument(
        "--baseline-path",
        help="also time one-shot steps with the operator and agents of this checkout, first",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    p.set_defaults(func=run)

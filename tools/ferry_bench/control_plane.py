"""`ferry bench control-plane`: a RefitJob over N target pods on kwok GPU nodes.

Real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(`dev/kwok.py`); the operator as a real process; the agents simulated in this
process (`simagents.py`: real agent write paths, no bytes moved). For each N:

- `assigned_s`: from the create call returning (the job is stored) until a watch
  shows every target with an assignment in the job's status;
- `assigned_on_leases_s`: until every target's assignment is on its agent's Lease,
  where the agent watches for it;
- `complete_s`: from the last simulated agent's Done report returning until the
  job is Complete (the operator folds reports once a second);
- `job_bytes`: the job as stored in etcd (read with etcdctl: the value bytes under
  /registry/ferry.dev/refitjobs/NS/NAME, managedFields included), with every target
  in flight, at Complete, and a second after;
- operator RSS and CPU from /proc of the operator process;
- apiserver requests: the delta of `apiserver_request_total` from its /metrics.

The baseline measured in the same run is one agent report's round trip
(`write_p50_s`): `assigned_s` reads as that many round trips.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from ferry_api import GROUP, VERSION, leases
from ferry_dev.controlplane import ControlPlane
from ferry_dev.kwok import GPU_RESOURCE, Kwok
from ferry_dev.operatorproc import OperatorProcess, start_operator

from .simagents import Fleet, SimAgent

GOALS = {"assigned_s": 1.0, "job_kb": 300, "operator_rss_mb": 300}  # issue 8, at N=1000
GPUS_PER_NODE = 8
WEIGHT_BYTES = 16 << 30  # what each target would pull; only a number here


# -- cluster ----------------------------------------------------------------------
class Bench:
    def __init__(self, workdir: Path, inference_nodes: int, sources: int):
        self.cp = ControlPlane(workdir=workdir / "controlplane").start()
        self.kwok: Kwok | None = None
        try:
            self.cp.install_crds()
            self.kwok = Kwok(self.cp).start()
            self.kwok.add_gpu_nodes("gpu-node-", inference_nodes, {"ferry.dev/pool": "inference"})
            self.kwok.add_gpu_nodes(
                "trainer-node-", math.ceil(sources / GPUS_PER_NODE), {"ferry.dev/pool": "trainer"}
            )
        except BaseException:
            self.close()
            raise
        self.api = self.kwok.api()
        self.api.configuration.connection_pool_maxsize = 32
        self.api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 32
        self.workdir = workdir
        self.ssl = self.cp.ssl_context()

    def close(self) -> None:
        if self.kwok is not None:
            self.kwok.stop()
        self.cp.stop()

    def stored_bytes(self, namespace: str, name: str) -> int:
        """Size of the object's value in etcd, as kube-apiserver stored it (JSON for custom resources)."""
        assert self.kwok is not None and self.kwok.bin_dir is not None
        key = f"/registry/{GROUP}/refitjobs/{namespace}/{name}"
        out = subprocess.run(
            [
                str(self.kwok.bin_dir / "etcdctl"),
                "--endpoints",
                etcd_url(self.cp),
                "get",
                key,
                "-w",
                "json",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        kvs = json.loads(out.stdout).get("kvs") or []
        return len(base64.b64decode(kvs[0]["value"])) if kvs else 0

    def requests(self) -> dict[str, float]:
        """apiserver_request_total summed per resource (and `total`)."""
        out: dict[str, float] = {"total": 0.0}
        with urllib.request.urlopen(f"{self.cp.server}/metrics", context=self.ssl, timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            resource = (
                labels.split('resource="', 1)[1].split('"', 1)[0] if 'resource="' in labels else ""
            )
            out["total"] += float(value)
            out[resource] = out.get(resource, 0.0) + float(value)
        return out


def etcd_url(cp: ControlPlane) -> str:
    etcd = next(p for p in cp.procs if Path(str(p.args[0])).name == "etcd")
    args = [str(a) for a in etcd.args]
    return args[args.index("--listen-client-urls") + 1]


def _proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {
        k: int(v.split()[0])
        for k, v in (ln.split(":", 1) for ln in status.splitlines())
        if k in ("VmRSS", "VmHWM")
    }
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": kb["VmRSS"] / 1024,
        "rss_peak_mb": kb["VmHWM"] / 1024,
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    out = {k: int(v - before.get(k, 0.0)) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v}


def _managers(obj: dict[str, Any]) -> int:
    """managedFields entries on the job (the operator's alone, since agents report on Leases)."""
    return len(obj["metadata"].get("managedFields") or [])


# -- one run ------------------------------------------------------------------------
def _create_pods(
    core: k8s_client.CoreV1Api,
    fleet: Fleet,
    ns: str,
    prefix: str,
    count: int,
    labels: dict[str, str],
    pool: str,
) -> list[str]:
    names = [f"{prefix}{i:04d}" for i in range(count)]

    def create(name: str) -> None:
        core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "nodeSelector": {"ferry.dev/pool": pool},
                    "containers": [
                        {
                            "name": "engine",
                            "image": "example.invalid/engine:bench",
                            "resources": {"limits": {GPU_RESOURCE: "1"}},
                        }
                    ],
                },
            },
        )

    list(fleet.pool.map(create, names))
    return names


def _wait_running(core: k8s_client.CoreV1Api, ns: str, want: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    running: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(ns).items
        running = {
            p.metadata.name: p for p in pods if p.status.phase == "Running" and p.status.pod_ip
        }
        if len(running) >= want:
            return running
        time.sleep(0.5)
    raise TimeoutError(f"{len(running)}/{want} pods Running after {timeout:.0f}s")


def _wait(pred: Any, timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


class _Watcher(threading.Thread):
    """One watch, re-opened until stop(); every added or changed object goes to _see."""

    def __init__(self, name: str, list_fn: Any, *args: Any, **kw: Any):
        super().__init__(name=name, daemon=True)
        self._list, self._args, self._kw = list_fn, args, kw
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            w = k8s_watch.Watch()
            for ev in w.stream(self._list, *self._args, timeout_seconds=30, **self._kw):
                if self._stop.is_set():
                    w.stop()
                    break
                if ev["type"] in ("ADDED", "MODIFIED"):
                    self._see(ev["object"], time.monotonic())

    def _see(self, obj: Any, now: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()


class JobWatch(_Watcher):
    """Watches the job: when its status shows every target assigned, and Complete."""

    def __init__(self, api: k8s_client.ApiClient, ns: str, name: str, targets: int):
        super().__init__(
            "job-watch",
            k8s_client.CustomObjectsApi(api).list_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            "refitjobs",
            field_selector=f"metadata.name={name}",
        )
        self.targets = targets
        self.t_all_assigned: float | None = None
        self.t_complete: float | None = None
        self.last: dict[str, Any] = {}

    def _see(self, job: dict[str, Any], now: float) -> None:
        self.last = job
        status = job.get("status") or {}
        assigned = sum(1 for e in status.get("targets") or [] if e.get("attempts"))
        if self.t_all_assigned is None and assigned >= self.targets:
            self.t_all_assigned = now
        if self.t_complete is None and any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in status.get("conditions") or []
        ):
            self.t_complete = now


class LeaseWatch(_Watcher):
    """Plays the agents' side: one watch on every agent Lease of the namespace stands in
    for each agent's watch of its own. A target whose Lease shows its assignment reports
    Pulling on its Lease (the real agent's write path)."""

    def __init__(self, api: k8s_client.ApiClient, fleet: Fleet, ns: str, targets: int):
        super().__init__(
            "lease-watch",
            k8s_client.CoordinationV1Api(api).list_namespaced_lease,
            ns,
            label_selector=leases.LEASE_LABEL,
            deserialize=False,
        )  # plain JSON: cheap
        self.fleet, self.targets = fleet, targets
        self.rung: dict[str, tuple[str, int]] = {}  # pod -> (job uid, attempt) seen assigned
        self.pulling_writes: list[float] = []
        self.t_all_rung: float | None = None

    def _see(self, lease: dict[str, Any], now: float) -> None:
        pod = (lease.get("spec") or {}).get("holderIdentity")
        agent = self.fleet.agents.get(pod)
        if agent is None or pod in self.rung:
            return
        for uid, job in leases.read(lease["metadata"].get("annotations"), leases.ASSIGN).items():
            attempt = leases.attempt_of(job)
            self.rung[pod] = (uid, attempt)
            fut = self.fleet.submit(agent.report, uid, attempt, "Pulling", 0)
            fut.add_done_callback(self._pulled)
        if self.t_all_rung is None and len(self.rung) >= self.targets:
            self.t_all_rung = now

    def _pulled(self, fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.pulling_writes.append(fut.result())


def _measure(
    b: Bench,
    r: dict[str, Any],
    watch: JobWatch,
    agents: LeaseWatch,
    fleet: Fleet,
    op: OperatorProcess,
    ns: str,
    tgts: list[str],
    t_stored: float,
    req0: dict[str, float],
    cpu0: dict[str, float],
    timeout: float,
) -> None:
    custom = k8s_client.CustomObjectsApi(b.api)
    n = len(tgts)
    _wait(lambda: watch.t_all_assigned is not None, timeout, "every target to be assigned")
    assert watch.t_all_assigned is not None
    r["assigned_s"] = round(watch.t_all_assigned - t_stored, 3)
    _wait(lambda: agents.t_all_rung is not None, timeout, "every assignment on its agent's Lease")
    assert agents.t_all_rung is not None
    r["assigned_on_leases_s"] = round(agents.t_all_rung - t_stored, 3)
    _wait(lambda: len(agents.pulling_writes) >= n or fleet.errors, timeout, "Pulling reports")
    if fleet.errors:
        raise RuntimeError(f"agent writes failed: {fleet.errors[:3]}")
    t_pulling = time.monotonic()
    r["pulling_reported_s"] = round(t_pulling - t_stored, 3)
    size_inflight = b.stored_bytes(ns, "refit")
    managers_inflight = _managers(
        custom.get_namespaced_custom_object(GROUP, VERSION, ns, "refitjobs", "refit")
    )
    done_writes = [
        f.result()
        for f in [
            fleet.submit(fleet.agents[p].report, *agents.rung[p], "Done", WEIGHT_BYTES, 0.5)
            for p in tgts
        ]
    ]
    t_reported = time.monotonic()
    r["done_reports_s"] = round(t_reported - t_pulling, 3)
    _wait(lambda: watch.t_complete is not None, timeout, "the job to be Complete")
    assert watch.t_complete is not None
    r["complete_s"] = round(watch.t_complete - t_reported, 3)
    req1, cpu1 = b.requests(), _proc_stats(op.proc.pid)
    size_complete = b.stored_bytes(ns, "refit")
    time.sleep(1.0)
    final = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "refitjobs", "refit")
    size_final = b.stored_bytes(ns, "refit")
    req2, cpu2 = b.requests(), _proc_stats(op.proc.pid)
    writes = agents.pulling_writes + done_writes
    r.update(
        {
            "write_p50_s": round(statistics.median(writes), 4),
            "write_retries": fleet.retries,
            "assigned_over_write_p50": round(r["assigned_s"] / statistics.median(writes), 1),
            "job_bytes": {
                "in_flight": size_inflight,
                "at_complete": size_complete,
                "final": size_final,
            },
            "managed_fields_entries": {"in_flight": managers_inflight, "final": _managers(final)},
            "job_phase": (final.get("status") or {}).get("phase"),
            "operator": {
                "rss_mb": round(cpu1["rss_mb"], 1),
                "rss_peak_mb": round(cpu2["rss_peak_mb"], 1),
                "cpu_s_job": round(cpu1["cpu_s"] - cpu0["cpu_s"], 2),
                "cpu_s_job_and_after": round(cpu2["cpu_s"] - cpu0["cpu_s"], 2),
            },
            "apiserver_requests": {"job": _delta(req1, req0), "after": _delta(req2, req1)},
        }
    )


def _start_operator(b: Bench, n: int, operator_path: str | None) -> OperatorProcess:
    """The operator as `ferry operator run` with its defaults; `operator_path` puts another
    checkout's packages first on its PYTHONPATH (a before/after comparison)."""
    if not operator_path:
        return start_operator(b.cp.kubeconfig, b.workdir / f"operator-{n}.log")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        str(Path(operator_path) / d) for d in ("operator", "crds", "agent")
    )
    try:
        return start_operator(b.cp.kubeconfig, b.workdir / f"operator-{n}.log")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def run_one(
    b: Bench,
    n: int,
    sources: int,
    strategy: str,
    max_fan_out: int,
    lease_seconds: int,
    renew_seconds: float,
    timeout: float,
    operator_path: str | None = None,
    writers: int = 4,
) -> dict[str, Any]:
    ns = f"bench-{n}-{int(time.time()) % 100000}"
    core = k8s_client.CoreV1Api(b.api)
    custom = k8s_client.CustomObjectsApi(b.api)
    core.create_namespace({"metadata": {"name": ns}})
    _wait(lambda: core.list_namespaced_service_account(ns).items, 30, "the default ServiceAccount")
    fleet = Fleet(writers=writers, renew_seconds=renew_seconds)
    op: OperatorProcess | None = None
    t_setup = time.monotonic()
    try:
        srcs = _create_pods(core, fleet, ns, "trainer-", sources, {"app": "trainer"}, "trainer")
        tgts = _create_pods(core, fleet, ns, "inference-", n, {"app": "inference"}, "inference")
        pods = _wait_running(core, ns, n + sources, timeout)
        info = {
            "state": "Ready",
            "version": "1",
            "fingerprint": "sha256:" + "ab" * 32,
            "tensors": 291,
            "bytes": WEIGHT_BYTES,
        }
        for p in srcs + tgts:
            pod = pods[p]
            fleet.add(
                SimAgent(
                    p,
                    ns,
                    pod.spec.node_name,
                    pod.status.pod_ip,
                    b.api,
                    lease_seconds,
                    info if p in srcs else None,
                )
            )
        op = _start_operator(b, n, operator_path)
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            "weightsources",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "WeightSource",
                "metadata": {"name": "policy"},
                "spec": {
                    "model": {"name": "bench/policy", "revision": "main"},
                    "selector": {"matchLabels": {"app": "trainer"}},
                    "memory": "cuda",
                },
            },
        )
        fleet.start_heartbeat()
        fleet.each(lambda a: a.publish("policy"), srcs)

        def ws_ready() -> bool:
            ws = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "weightsources", "policy")
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (ws.get("status") or {}).get("conditions") or []
            )

        _wait(ws_ready, 60, "the WeightSource to be Ready", every=0.2)
        setup_s = time.monotonic() - t_setup
        time.sleep(2)  # let the operator settle after start-up before the clock runs

        watch = JobWatch(b.api, ns, "refit", n)
        watch.start()
        agents = LeaseWatch(b.api, fleet, ns, n)
        agents.start()
        req0, cpu0 = b.requests(), _proc_stats(op.proc.pid)
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            "refitjobs",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "RefitJob",
                "metadata": {"name": "refit"},
                "spec": {
                    "sourceRef": {"name": "policy"},
                    "targets": {"matchLabels": {"app": "inference"}},
                    "strategy": {"type": strategy, "maxFanOut": max_fan_out},
                    "timeoutSeconds": int(timeout),
                },
            },
        )
        t_stored = time.monotonic()
        r: dict[str, Any] = {
            "targets": n,
            "sources": sources,
            "strategy": strategy,
            "max_fan_out": max_fan_out,
            "nodes": len({pods[p].spec.node_name for p in tgts}),
            "setup_s": round(setup_s, 2),
        }
        try:
            _measure(b, r, watch, agents, fleet, op, ns, tgts, t_stored, req0, cpu0, timeout)
        except (TimeoutError, RuntimeError) as exc:
            # A run that cannot finish still says how far it got and what it cost.
            r["error"] = str(exc)
            now = _proc_stats(op.proc.pid)
            r["reported"] = {"pulling": len(agents.pulling_writes)}
            r["elapsed_s"] = round(time.monotonic() - t_stored, 1)
            r["job_bytes"] = {"at_error": b.stored_bytes(ns, "refit")}
            r["managed_fields_entries"] = {"at_error": _managers(watch.last)}
            r["operator"] = {
                "rss_mb": round(now["rss_mb"], 1),
                "rss_peak_mb": round(now["rss_peak_mb"], 1),
                "cpu_s_job": round(now["cpu_s"] - cpu0["cpu_s"], 2),
            }
            r["apiserver_requests"] = {"job": _delta(b.requests(), req0)}
            if agents.pulling_writes:
                r["write_p50_s"] = round(statistics.median(agents.pulling_writes), 4)
        return r
    finally:
        if "watch" in locals():
            watch.stop()
            agents.stop()
        fleet.stop()
        if op is not None:  # the job's finalizer is the operator's to remove
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "refitjobs", "refit")
                _wait(
                    lambda: (
                        not custom.list_namespaced_custom_object(GROUP, VERSION, ns, "refitjobs")[
                            "items"
                        ]
                    ),
                    60,
                    "the job to go",
                    every=0.5,
                )
            except (k8s_client.ApiException, TimeoutError):
                pass
            op.stop()
        core.delete_namespace(ns)
        # Free the GPUs for the next run: kube-controller-manager deletes the pods, kwok removes them.
        _wait(lambda: not core.list_namespaced_pod(ns).items, 180, f"pods of {ns} to go")


def run(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in str(args.targets).split(",") if x]
    nodes = max(args.nodes, math.ceil(max(sizes) / GPUS_PER_NODE))
    workdir = Path(tempfile.mkdtemp(prefix="ferry-bench-cp-"))
    load0 = os.getloadavg()
    b = Bench(workdir, nodes, args.sources)
    runs = []
    try:
        for n in sizes:
            r = run_one(
                b,
                n,
                args.sources,
                args.strategy,
                args.max_fan_out,
                args.lease_seconds,
                args.renew_seconds,
                args.timeout,
                args.operator_path,
                args.agent_writers,
            )
            runs.append(r)
            print(f"N={n}: {json.dumps(r)}", file=sys.stderr)
    finally:
        b.close()
    result = {
        "bench": "control-plane",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "ferry bench control-plane " + " ".join(sys.argv[3:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "cluster": {
            "kube": "v1.35.4",
            "kwok": "v0.8.0",
            "etcd": "v3.6.16",
            "gpu_nodes": nodes,
            "gpus_per_node": GPUS_PER_NODE,
            "lease_seconds": args.lease_seconds,
            "renew_seconds": args.renew_seconds,
            "agent_writers": args.agent_writers,
        },
        "operator_path": args.operator_path,
        "size_method": "etcdctl get /registry/ferry.dev/refitjobs/NS/NAME -w json: length of the "
        "stored value (JSON, managedFields included)",
        "goals_at_1000": GOALS,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else _table(runs))
    return 0


def _table(runs: list[dict[str, Any]]) -> str:
    rows = ["targets  assigned_s  complete_s  job_kB(flight/final)  rss_MB  cpu_s  requests"]
    for r in runs:
        if "error" in r:
            rows.append(f"{r['targets']:>7}  {r['error']}")
            continue
        rows.append(
            f"{r['targets']:>7}  {r['assigned_s']:>10}  {r['complete_s']:>10}  "
            f"{r['job_bytes']['in_flight'] / 1000:>8.0f}/{r['job_bytes']['final'] / 1000:<8.0f}  "
            f"{r['operator']['rss_mb']:>6}  {r['operator']['cpu_s_job']:>5}  "
            f"{r['apiserver_requests']['job'].get('total', 0)}"
        )
    return "\n".join(rows)


def register(sub: Any) -> None:
    p = sub.add_parser("control-plane", help="RefitJob over N simulated targets on kwok GPU nodes")
    p.add_argument("--targets", default="10,100,1000", help="comma-separated target counts")
    p.add_argument("--sources", type=int, default=8, help="source pods (simulated trainer agents)")
    p.add_argument("--strategy", choices=("direct", "tree", "chain"), default="chain")
    p.add_argument("--max-fan-out", type=int, default=4)
    p.add_argument("--nodes", type=int, default=125, help="fake 8-GPU nodes for the targets")
    # 1,000 agents renewing every 5 s is 200 Lease writes/s; on the 2-core shared machine
    # the heartbeat fell behind (Leases expired mid-job, the sources turned Stale), so the
    # benchmark stretches the cadence 4x. The operator's work per Lease is the same.
    p.add_argument(
        "--lease-seconds", type=int, default=60, help="agent Lease duration (agents: 15)"
    )
    p.add_argument(
        "--renew-seconds", type=float, default=20.0, help="agent Lease renewal (agents: 5)"
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument(
        "--agent-writers",
        type=int,
        default=8,
        help="simulated agents' reports in flight at once (see simagents.Fleet)",
    )
    p.add_argument(
        "--operator-path", help="run the operator from this checkout instead (before/after)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help="also write the JSON here")
    p.set_defaults(func=run)

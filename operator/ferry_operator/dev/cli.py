"""`ferry dev up | down | status`: the local cluster, kept running between commands.

`up` starts everything in the background, writes a state file, and prints the
kubeconfig path; `down` stops exactly the processes `up` started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from .cluster import DevCluster, demo_layout

DEFAULT_DIR = Path(os.environ.get("FERRY_DEV_DIR", Path.home() / ".cache" / "ferry" / "dev"))


def _state_file(workdir: Path) -> Path:
    return workdir / "state.json"


def cmd_up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if _state_file(workdir).exists():
        print(f"a dev cluster is already up (state in {workdir}); run `ferry dev down` first")
        return 1
    if workdir.exists():
        shutil.rmtree(workdir)
    cluster = DevCluster(workdir, sources=args.sources, targets=args.targets, memory=args.memory,
                         kwok_nodes=args.gpu_nodes if args.kwok else 0)
    try:
        cluster.up()
        layout = demo_layout(args.tensors, args.bytes)
        for pod, a in cluster.agents.items():
            if a.role == "source":
                cluster.load_weights(pod, "1", layout, seed=1)
    except BaseException:
        cluster.down()
        raise
    assert cluster.cp is not None and cluster.operator is not None
    kwok = cluster.kwok.procs if cluster.kwok else []
    pids = [p.pid for p in cluster.cp.procs] + [p.pid for p in kwok] + [cluster.operator.proc.pid] + \
        [a.proc.pid for a in cluster.agents.values()]
    state = {"kubeconfig": str(cluster.cp.kubeconfig), "pids": pids,
             "agents": {p: {"endpoint": a.endpoint, "socket": a.socket, "role": a.role}
                        for p, a in cluster.agents.items()}}
    _state_file(workdir).write_text(json.dumps(state, indent=2))
    print(cluster.cp.kubeconfig)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    state_file = _state_file(workdir)
    if not state_file.exists():
        print("no dev cluster is up")
        return 0
    state: dict[str, Any] = json.loads(state_file.read_text())
    # Reverse start order: agents, operator, apiserver, etcd. Each was started in
    # its own session, so signal its process group.
    for pid in reversed(state["pids"]):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    state_file.unlink()
    shutil.rmtree(workdir, ignore_errors=True)
    print("stopped the dev cluster")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("dev", help="a local cluster: control plane, operator, pods and their agents")
    dsub = p.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    up = dsub.add_parser("up", help="start it in the background; prints the kubeconfig path")
    up.add_argument("--sources", type=int, default=1)
    up.add_argument("--targets", type=int, default=3)
    up.add_argument("--memory", choices=("host", "cuda"), default="host")
    up.add_argument("--tensors", type=int, default=120, help="tensors in the sources' weights")
    up.add_argument("--bytes", type=int, default=64 << 20, help="bytes of weights per source")
    up.add_argument("--kwok", action="store_true",
                    help="add kube-controller-manager, kube-scheduler and kwok with fake GPU nodes: "
                         "pods asking for nvidia.com/gpu are scheduled onto them and run without containers")
    up.add_argument("--gpu-nodes", type=int, default=125, help="fake 8-GPU nodes (with --kwok)")
    up.add_argument("--dir", default=str(DEFAULT_DIR))
    up.set_defaults(func=cmd_up)
    down = dsub.add_parser("down", help="stop everything `up` started")
    down.add_argument("--dir", default=str(DEFAULT_DIR))
    down.set_defaults(func=cmd_down)

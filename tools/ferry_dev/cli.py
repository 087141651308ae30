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
    if args.node:
        return _up_node(workdir, args)
    cluster = DevCluster(
        workdir,
        sources=args.sources,
        targets=args.targets,
        memory=args.memory,
        kwok_nodes=args.gpu_nodes if args.kwok else 0,
    )
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
    pids = (
        [p.pid for p in cluster.cp.procs]
        + [p.pid for p in kwok]
        + [cluster.operator.proc.pid]
        + [a.proc.pid for a in cluster.agents.values()]
    )
    state = {
        "kubeconfig": str(cluster.cp.kubeconfig),
        "pids": pids,
        "agents": {
            p: {"endpoint": a.endpoint, "socket": a.socket, "role": a.role}
            for p, a in cluster.agents.items()
        },
    }
    _state_file(workdir).write_text(json.dumps(state, indent=2))
    print(cluster.cp.kubeconfig)
    return 0


def _up_node(workdir: Path, args: argparse.Namespace) -> int:
    """A control plane, kube-controller-manager, kube-scheduler and a real node (kubelet,
    containerd, runc, kube-proxy) with Ferry's agent and operator images imported.
    With `--ferry` (`make demo NODE=1`) also what tests/node/test_refit.py runs: Ferry
    installed by helm, a WeightSource, trainer and inference pods (injected by the
    webhook), and a RefitJob manifest to apply."""
    from . import images
    from .controlplane import ControlPlane
    from .kwok import Kwok
    from .node import Node, apiserver_args

    cp = ControlPlane(workdir=workdir / "controlplane", extra_apiserver_args=apiserver_args())
    kwok = node = None
    hints = ""
    try:
        cp.start()
        if not args.ferry:  # with --ferry the chart installs them, as on a fresh cluster
            cp.install_crds()
        kwok = Kwok(cp).start()
        node = Node(cp).start()
        refs = {kind: node.import_image(images.build(kind)) for kind in ("agent", "operator")}
        if args.ferry:
            hints = _install_ferry(workdir, cp.kubeconfig, refs, args)
    except BaseException:
        for part in (node, kwok, cp):
            if part is not None:
                part.stop()
        raise
    pids = [p.pid for p in cp.procs] + [p.pid for p in kwok.procs]
    state = {
        "kubeconfig": str(cp.kubeconfig),
        "pids": pids,
        "images": refs,
        "node": {
            "controlplane": str(cp.workdir),
            "bin_dir": str(node.bin_dir),
            "pids": {Path(p.args[0]).name: p.pid for p in node.procs},
        },
    }
    _state_file(workdir).write_text(json.dumps(state, indent=2))
    if args.ferry:
        print(hints)
    print(cp.kubeconfig)
    return 0


def _install_ferry(
    workdir: Path, kubeconfig: Path, refs: dict[str, str], args: argparse.Namespace
) -> str:
    """helm install, the demo's WeightSource and pods; returns what to run next."""
    import yaml
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    from . import node_ferry

    done = node_ferry.helm_install(kubeconfig, refs["operator"], refs["agent"])
    if done.returncode != 0:
        raise RuntimeError(f"helm install: {done.stderr.strip()}")
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    k8s_client.CustomObjectsApi(api).create_namespaced_custom_object(
        node_ferry.GROUP, node_ferry.VERSION, "default", "weightsources", node_ferry.weightsource()
    )
    core = k8s_client.CoreV1Api(api)
    if not node_ferry.wait_injecting(core):
        raise RuntimeError("the injection webhook did not inject a dry-run pod within 90 s")
    node_ferry.agent_token_secret(core, "default")
    pods = [(f"trainer-{i}", "trainer", node_ferry.SOURCE_ENGINE) for i in range(args.sources)]
    pods += [(f"inference-{i}", "inference", node_ferry.TARGET_ENGINE) for i in range(args.targets)]
    for name, app, script in pods:
        core.create_namespaced_pod(
            "default", node_ferry.engine_pod(name, app, refs["agent"], script)
        )
    job = workdir / "refitjob.yaml"
    job.write_text(yaml.safe_dump(node_ferry.refitjob("refit")))
    k = f"kubectl --kubeconfig {kubeconfig}"
    return "\n".join(
        [
            f"Ferry is installed (helm release {node_ferry.RELEASE} in {node_ferry.NAMESPACE}); pods "
            f"{', '.join(p for p, _, _ in pods)} are starting in namespace default. Next:",
            f"  {k} get pods -o wide",
            f"  {k} get weightsource policy   # Ready once trainer-0 published version 1",
            f"  {k} apply -f {job}",
            f"  {k} wait --for=condition=Complete refitjob/refit --timeout=180s",
            f"  {k} logs trainer-0 -c engine; {k} logs inference-0 -c engine   # the same sha256",
            f"  {k} logs inference-0 -c ferry-agent",
            "  ferry dev down   # stops everything",
        ]
    )


def _stop_pid(pid: int) -> None:
    """SIGTERM the process group `pid` leads (started in its own session); SIGKILL after 10 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


def _down_node(node_state: dict[str, Any]) -> None:
    from .controlplane import ControlPlane
    from .node import Node

    node = Node(
        ControlPlane(workdir=Path(node_state["controlplane"])), bin_dir=Path(node_state["bin_dir"])
    )
    pids = node_state["pids"]
    for name in ("kube-proxy", "kubelet"):
        if name in pids:
            _stop_pid(pids[name])
    node._remove_containers()
    if "containerd" in pids:
        _stop_pid(pids["containerd"])
    node.release_host()


def cmd_down(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    state_file = _state_file(workdir)
    if not state_file.exists():
        print("no dev cluster is up")
        return 0
    state: dict[str, Any] = json.loads(state_file.read_text())
    if "node" in state:
        _down_node(state["node"])
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
    p = sub.add_parser(
        "dev", help="a local cluster: control plane, operator, pods and their agents"
    )
    dsub = p.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    up = dsub.add_parser("up", help="start it in the background; prints the kubeconfig path")
    up.add_argument("--sources", type=int, default=1)
    up.add_argument("--targets", type=int, default=3)
    up.add_argument("--memory", choices=("host", "cuda"), default="host")
    up.add_argument("--tensors", type=int, default=120, help="tensors in the sources' weights")
    up.add_argument("--bytes", type=int, default=64 << 20, help="bytes of weights per source")
    up.add_argument(
        "--kwok",
        action="store_true",
        help="add kube-controller-manager, kube-scheduler and kwok with fake GPU nodes: "
        "pods asking for nvidia.com/gpu are scheduled onto them and run without containers",
    )
    up.add_argument(
        "--node",
        action="store_true",
        help="a real node instead of local agent processes: kubelet, containerd, runc and "
        "kube-proxy on this machine (root; Debian's containerd, runc, "
        "containernetworking-plugins and iptables), Ferry's images imported",
    )
    up.add_argument(
        "--ferry",
        action="store_true",
        help="with --node: also helm install Ferry, a WeightSource and trainer/inference "
        "pods (--sources, --targets) running the engine client; prints what to run next",
    )
    up.add_argument("--gpu-nodes", type=int, default=125, help="fake 8-GPU nodes (with --kwok)")
    up.add_argument("--dir", default=str(DEFAULT_DIR))
    up.set_defaults(func=cmd_up)
    down = dsub.add_parser("down", help="stop everything `up` started")
    down.add_argument("--dir", default=str(DEFAULT_DIR))
    down.set_defaults(func=cmd_down)

"""`ferry agent run | pull | health`: the sidecar process and two small helpers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from .request import PullRequest

SIZE_UNITS = {
    "": 1,
    "k": 1 << 10,
    "ki": 1 << 10,
    "m": 1 << 20,
    "mi": 1 << 20,
    "g": 1 << 30,
    "gi": 1 << 30,
    "t": 1 << 40,
    "ti": 1 << 40,
}


def parse_size(text: str) -> int:
    """'1Gi', '64MiB', '300m', '4096' -> bytes (binary units)."""
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgti")
    unit = t[len(num) :]
    if unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(float(num) * SIZE_UNITS[unit])


def parse_devices(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """'0,1,2,3' -> (0, 1, 2, 3)."""
    if isinstance(text, tuple):
        return text
    try:
        out = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"devices {text!r}: comma-separated CUDA ordinals"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("devices: at least one CUDA ordinal")
    return out


def _token(args: argparse.Namespace) -> str:
    if not args.token_file:
        raise SystemExit("--token-file (or FERRY_TOKEN_FILE) is required")
    with open(args.token_file) as f:
        return f.read().strip()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agent", help="run the per-pod agent, or talk to one")
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run", help="start the agent (identity from POD_NAME/POD_NAMESPACE/POD_IP)"
    )
    run.add_argument(
        "--grpc-port",
        type=int,
        default=int(os.environ.get("FERRY_GRPC_PORT", 7470)),
        help="0 picks a free port (see --ready-file)",
    )
    run.add_argument("--grpc-host", default="0.0.0.0")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("FERRY_METRICS_PORT", 9470)),
        help="/metrics, /healthz, /readyz; -1 disables",
    )
    run.add_argument(
        "--control-socket", default=os.environ.get("FERRY_AGENT_SOCKET", "/run/ferry/agent.sock")
    )
    run.add_argument(
        "--memory", choices=("host", "cuda"), default=os.environ.get("FERRY_MEMORY", "host")
    )
    run.add_argument(
        "--devices",
        type=parse_devices,
        default=os.environ.get("FERRY_DEVICES") or os.environ.get("FERRY_DEVICE", "0"),
        help="CUDA ordinals of the pod's local ranks, in rank order ('0,1,2,3'; one per GPU); "
        "with --memory host, as many simulated ranks",
    )
    run.add_argument(
        "--device", dest="devices", type=parse_devices, help="one CUDA ordinal (= --devices N)"
    )
    run.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="local ranks 0..N-1 on devices 0..N-1 (overrides --devices)",
    )
    run.add_argument("--slab-bytes", type=parse_size, default=parse_size("1Gi"))
    run.add_argument("--chunk-bytes", type=parse_size, default=parse_size("64Mi"))
    run.add_argument(
        "--max-slab-bytes",
        type=parse_size,
        default=os.environ.get("FERRY_MAX_SLAB_BYTES"),
        help="most slab memory this agent holds (a layout past it, declared or offered by a "
        "source, is refused: LayoutTooLarge); default for host memory 90%% of the smaller of "
        "the host memory and /dev/shm, none for cuda; 0: no limit",
    )
    run.add_argument("--max-inflight", type=int, default=32)
    run.add_argument("--token-file", default=os.environ.get("FERRY_TOKEN_FILE"))
    run.add_argument(
        "--peer-auth",
        choices=("mtls", "token"),
        default=os.environ.get("FERRY_PEER_AUTH") or None,
        help="mtls: per-pod certificates from the operator (a CSR sent with the pod's token), "
        "peers served and dialled by pod identity; the default in cluster mode, where an "
        "agent that gets no certificate does not start. token: the shared --token-file over "
        "plaintext; the default standalone, and only explicitly in a cluster (dev)",
    )
    run.add_argument(
        "--rails",
        default=os.environ.get("FERRY_RAILS", "auto"),
        help="auto | stripe | off | map '0=mlx5_0:1;1=mlx5_1:1'",
    )
    run.add_argument("--nixl-threads", type=int, default=0, help="UCX backend num_threads")
    run.add_argument("--post-threads", type=int, default=1, help="threads posting READs per lane")
    run.add_argument("--lanes", type=int, default=0, help="NIXL agents for READs (0: auto)")
    run.add_argument(
        "--progress-delay-us", type=int, default=1000, help="NIXL progress thread idle delay"
    )
    run.add_argument(
        "--header-memory",
        choices=("host", "slab"),
        default="host",
        help="host: version headers in host memory, also a shm file a same-pod target maps; "
        "slab: in the slabs' memory kind, read by peers over NIXL only",
    )
    run.add_argument(
        "--same-gpu",
        choices=("ipc", "nixl"),
        default=os.environ.get("FERRY_SAME_GPU", "ipc"),
        help="a source on this agent's own GPU: copy through CUDA IPC, or READ over NIXL",
    )
    run.add_argument(
        "--digests",
        choices=("on", "off"),
        default=os.environ.get("FERRY_DIGESTS", "on"),
        help="content digests of each version the engine publishes (host: ~0.1-0.15 s/GiB "
        "per publish); off: targets that verify refuse this agent's versions",
    )
    run.add_argument("--layout", help="JSON file [{name, dtype, shape}] to declare at start")
    run.add_argument(
        "--ready-file", help="write {endpoint, grpc_port, metrics_port, ...} here once serving"
    )
    run.add_argument("--log-level", default=os.environ.get("FERRY_LOG_LEVEL", "INFO"))
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser(
        "pull",
        help="ask a target agent to pull from sources (token mode: in cluster mode Pull is "
        "served only to the pod itself, ferry_agent.client.EngineClient.pull)",
    )
    pull.add_argument("--target", required=True, help="host:port of the target agent")
    pull.add_argument(
        "--source", action="append", required=True, help="host:port (repeat to stripe)"
    )
    pull.add_argument("--version", default="latest")
    pull.add_argument("--timeout", type=float, default=60.0)
    pull.add_argument("--token-file", default=os.environ.get("FERRY_TOKEN_FILE"))
    pull.set_defaults(func=cmd_pull)

    health = sub.add_parser("health", help="query an agent's health")
    health.add_argument("--target", required=True)
    health.add_argument("--token-file", default=os.environ.get("FERRY_TOKEN_FILE"))
    health.set_defaults(func=cmd_health)


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent, AgentConfig
    from .layout import TensorSpec

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from . import k8s

    in_cluster = k8s.enabled()
    peer_auth = args.peer_auth or ("mtls" if in_cluster else "token")
    if peer_auth not in ("mtls", "token"):  # FERRY_PEER_AUTH is not checked by argparse
        print(
            f"ferry agent run: --peer-auth (FERRY_PEER_AUTH) {peer_auth!r}: mtls or token",
            file=sys.stderr,
        )
        return 2
    if peer_auth == "mtls" and not in_cluster:
        print(
            "ferry agent run: --peer-auth mtls needs the control plane (in a cluster, or "
            "KUBECONFIG): the operator signs the pod's certificate",
            file=sys.stderr,
        )
        return 2
    if peer_auth == "token" and not args.token_file:
        print("ferry agent run: --token-file (or FERRY_TOKEN_FILE) is required", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        pod=os.environ.get("POD_NAME", os.uname().nodename),
        namespace=os.environ.get("POD_NAMESPACE", "default"),
        pod_ip=os.environ.get("POD_IP", "127.0.0.1"),
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        control_socket=args.control_socket,
        memory=args.memory,
        devices=tuple(range(args.ranks)) if args.ranks else parse_devices(args.devices),
        slab_bytes=args.slab_bytes,
        chunk_bytes=args.chunk_bytes,
        max_inflight=args.max_inflight,
        token_file=args.token_file,
        rails=args.rails,
        nixl_threads=args.nixl_threads,
        post_threads=args.post_threads,
        lanes=args.lanes,
        progress_delay_us=args.progress_delay_us,
        header_memory=args.header_memory,
        same_gpu=args.same_gpu,
        max_slab_bytes=args.max_slab_bytes,
        digests=args.digests == "on",
    )
    tls = _peer_tls(cfg) if peer_auth == "mtls" else None
    if in_cluster and tls is None:
        logging.getLogger("ferry_agent").warning(
            "--peer-auth token in cluster mode: peers authenticate by the shared token over "
            "plaintext (dev only)"
        )
    agent = Agent(cfg, tls=tls)
    kube = artifacts = None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if in_cluster:
            from .k8s import runtime

            artifacts = runtime.prepare(agent)
        agent.start()
        if args.layout:
            with open(args.layout) as f:
                specs = [TensorSpec.from_dict(d) for d in json.load(f)]
            for rank in agent.ranks:  # every local rank: a shard layout comes from its engine
                rank.declare(specs)
        ready = {
            "endpoint": agent.endpoint,
            "grpc_port": agent.server.port,
            "pid": os.getpid(),
            "metrics_port": agent.metrics_server.port if agent.metrics_server else None,
            "control_socket": cfg.control_socket,
            "agent": agent.name,
            "ranks": len(agent.ranks),
            "rails": [list(r.rails.devices) for r in agent.ranks],
        }
        logging.getLogger("ferry_agent").info("serving %s", json.dumps(ready))
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(ready, f)
            os.replace(tmp, args.ready_file)
        if in_cluster:
            kube = _attach_kube(agent, cfg, artifacts)
        while not stop.wait(0.5):
            pass
    finally:
        if kube is not None:
            kube.stop()  # cancel pulls, write Stale, release the Lease: before the slabs go
        agent.close()
    return 0


def _peer_tls(cfg: Any) -> Any:
    """This pod's certificate (a CSR the operator signs) and whom it talks to."""
    from kubernetes import client

    from .auth import PeerTls
    from .k8s import runtime
    from .k8s.peerpolicy import ClusterPeers
    from .k8s.podcert import PodCertificates
    from .peerid import PodIdentity

    api = runtime.api_client()
    uid = client.CoreV1Api(api).read_namespaced_pod(cfg.pod, cfg.namespace).metadata.uid
    me = PodIdentity(cfg.namespace, cfg.pod, uid)
    certs = PodCertificates(api, me).start()
    return PeerTls(me, certs.material, ClusterPeers(api, me).allow)


def _attach_kube(agent: Any, cfg: Any, artifacts: Any = None) -> Any:
    """Report to the control plane (the agent runs in a cluster, or was given a kubeconfig)."""
    from .k8s import runtime

    return runtime.attach(
        agent,
        pod=cfg.pod,
        namespace=cfg.namespace,
        node=os.environ.get("NODE_NAME") or None,
        endpoint=agent.endpoint,
        lease_seconds=int(os.environ.get("FERRY_LEASE_SECONDS", "15")),
        renew_seconds=float(os.environ.get("FERRY_RENEW_SECONDS", "5")),
        artifacts=artifacts,
    )


def cmd_pull(args: argparse.Namespace) -> int:
    from .errors import FerryError
    from .peer import AgentClient

    with AgentClient(args.target, _token(args)) as c:
        try:
            r = c.pull(PullRequest(args.source, version=args.version, timeout_s=args.timeout))
        except FerryError as exc:
            print(json.dumps(exc.to_dict()))
            return 1
    print(
        json.dumps(
            {
                "version": r.version,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "GBps": r.gbps,
                "descriptors": r.descriptors,
                "attempts": r.attempts,
            }
        )
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from .peer import AgentClient

    with AgentClient(args.target, _token(args)) as c:
        h = c.health()
    print(
        json.dumps(
            {
                "ok": h.ok,
                "state": h.state,
                "pod": h.pod,
                "version": h.version,
                "fingerprint": h.fingerprint,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

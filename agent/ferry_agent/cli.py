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
        "--device", type=int, default=int(os.environ.get("FERRY_DEVICE", 0)), help="CUDA ordinal"
    )
    run.add_argument("--slab-bytes", type=parse_size, default=parse_size("1Gi"))
    run.add_argument("--chunk-bytes", type=parse_size, default=parse_size("64Mi"))
    run.add_argument("--max-inflight", type=int, default=32)
    run.add_argument("--token-file", default=os.environ.get("FERRY_TOKEN_FILE"))
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
        help="version headers in host memory, or in the slabs' memory kind",
    )
    run.add_argument("--layout", help="JSON file [{name, dtype, shape}] to declare at start")
    run.add_argument(
        "--ready-file", help="write {endpoint, grpc_port, metrics_port, ...} here once serving"
    )
    run.add_argument("--log-level", default=os.environ.get("FERRY_LOG_LEVEL", "INFO"))
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser("pull", help="ask a target agent to pull from sources")
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
    if not args.token_file:
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
        device=args.device,
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
    )
    agent = Agent(cfg)
    kube = None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        from .k8s import runtime

        artifacts = runtime.prepare(agent)
        agent.start()
        if args.layout:
            with open(args.layout) as f:
                agent.declare([TensorSpec.from_dict(d) for d in json.load(f)])
        ready = {
            "endpoint": agent.endpoint,
            "grpc_port": agent.server.port,
            "pid": os.getpid(),
            "metrics_port": agent.metrics_server.port if agent.metrics_server else None,
            "control_socket": cfg.control_socket,
            "agent": agent.name,
            "rails": list(agent.rails.devices),
        }
        logging.getLogger("ferry_agent").info("serving %s", json.dumps(ready))
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(ready, f)
            os.replace(tmp, args.ready_file)
        kube = _attach_kube(agent, cfg, artifacts)
        while not stop.wait(0.5):
            pass
    finally:
        if kube is not None:
            kube.stop()  # cancel pulls, write Stale, release the Lease: before the slabs go
        agent.close()
    return 0


def _attach_kube(agent: Any, cfg: Any, artifacts: Any = None) -> Any:
    """Report to the control plane when running in a cluster (or given a kubeconfig)."""
    from .k8s import runtime

    if not runtime.enabled():
        return None
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
            r = c.pull(args.source, version=args.version, timeout_s=args.timeout)
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

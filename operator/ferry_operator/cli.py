"""`ferry operator run`: the kopf operator for all three kinds."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any


def _run(args: argparse.Namespace) -> int:
    os.environ["FERRY_HEALTH_PORT"] = str(args.health_port)
    os.environ["FERRY_RESYNC_SECONDS"] = str(args.resync_seconds)
    os.environ["FERRY_CANARY_SECONDS"] = str(args.canary_seconds)
    os.environ["FERRY_WATCH_SERVER_TIMEOUT"] = str(args.watch_timeout)
    os.environ["FERRY_PEERING"] = args.peering or ""
    os.environ["FERRY_PRIORITY"] = str(args.priority)
    os.environ["FERRY_WEBHOOK_PORT"] = str(args.webhook_port)
    os.environ["FERRY_WEBHOOK_HOST"] = args.webhook_host
    os.environ["FERRY_WEBHOOK_CERT_DIR"] = args.webhook_cert_dir
    os.environ["FERRY_WEBHOOK_CONFIG"] = args.webhook_config
    os.environ["FERRY_SCANNING"] = "on" if args.all_namespaces else "off"
    os.environ["FERRY_NAMESPACES"] = ",".join(args.namespace or [])
    import kopf

    import ferry_operator.main  # noqa: F401  (registers every handler)

    kopf.configure(verbose=args.verbose, debug=False)
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace or [],
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=args.priority,
        )
    )
    return 0


def add_run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the operator (kopf) until stopped")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", help="watch only this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    run.add_argument(
        "--health-port", type=int, default=8080, help="port for /healthz, /readyz, /metrics"
    )
    run.add_argument(
        "--resync-seconds", type=float, default=30.0, help="period of the level-triggered re-check"
    )
    run.add_argument(
        "--canary-seconds",
        type=float,
        default=10.0,
        help="canary lease renewal period; /healthz fails after 3 periods without seeing it",
    )
    run.add_argument(
        "--watch-timeout",
        type=float,
        default=60.0,
        help="server-side timeout of each watch request",
    )
    run.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering name for leader election when running more than one replica",
    )
    run.add_argument("--priority", type=int, default=0, help="kopf peering priority")
    run.add_argument(
        "--webhook-port",
        type=int,
        default=0,
        help="serve the sidecar-injection webhook on this port (0: off)",
    )
    run.add_argument(
        "--webhook-host",
        default="",
        help="name the apiserver uses to reach the webhook (a Service DNS name in a cluster)",
    )
    run.add_argument(
        "--webhook-cert-dir",
        default="",
        help="directory with tls.crt/tls.key/ca.crt; empty: self-managed certificates",
    )
    run.add_argument(
        "--webhook-config",
        choices=("managed", "ca-bundle", "external"),
        default="managed",
        help="who writes the MutatingWebhookConfiguration: the operator (kopf, managed), "
        "the chart with the operator writing only its caBundle (ca-bundle), or the "
        "chart with cert-manager injecting the CA (external)",
    )
    run.add_argument("--verbose", action="store_true")
    run.set_defaults(func=_run)


def register(sub: Any) -> None:
    op = sub.add_parser("operator", help="the Ferry operator")
    op_sub = op.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", required=True)
    add_run_parser(op_sub)

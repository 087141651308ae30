"""`kubectl ferry` (the `kubectl-ferry` console script).

  kubectl ferry status [-n NS | -A]
  kubectl ferry watch refitjob NAME [-n NS] [--timeout S]
  kubectl ferry refit SOURCE --targets SELECTOR [--strategy direct|tree|chain] [--version V]
                      [--name NAME] [--chunk-bytes 64Mi] [--no-watch]

Exit status: 0 done (the job Complete), 1 the job Failed, 2 timed out, not
found, permission denied or any other error (one line on stderr).

Progress is polled, one GET of the job per --interval (1 s): agents write their
progress about once a second, so a faster poll shows nothing new, and a poll
needs no resourceVersion bookkeeping, keeps redrawing elapsed time and ETA
between writes, and carries an explicit request timeout like every call here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import ValidationError

from ferry_api import API_VERSION
from ferry_api.objects import ObjectInvalid, read
from ferry_api.refitjob import RefitJob, RefitJobSpec

from .kube import Kube, NotFound, PluginError
from .progress import JobView, Rates, final_line, frame, job_view, plain_updates, redraw
from .selector import SelectorError, parse_selector
from .tables import KINDS, status_lines
from .units import parse_quantity

# Past the job's own deadline (spec.timeoutSeconds, after which the operator
# fails it) give the operator this long to say so before giving up.
DEADLINE_GRACE_S = 60.0
MIN_INTERVAL_S = 0.2


def _now() -> datetime:
    return datetime.now(UTC)


class Display:
    """Redraws the frame in place on a terminal; prints changed lines otherwise."""

    def __init__(self, out: TextIO, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.drawn = 0
        self.seen: dict[str, Any] = {}

    def show(self, jv: JobView) -> None:
        if self.tty:
            lines = frame(jv)
            self.out.write(redraw(self.drawn, lines, shutil.get_terminal_size().columns))
            self.drawn = len(lines)
        else:
            for line in plain_updates(self.seen, jv):
                self.out.write(line + "\n")
        self.out.flush()


def watch_job(
    kube: Kube,
    namespace: str,
    name: str,
    out: TextIO,
    interval: float = 1.0,
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = _now,
    tty: bool | None = None,
) -> int:
    rates, display = Rates(), Display(out, tty)
    started, deadline = clock(), None
    seen_once = False
    while True:
        try:
            obj = read(RefitJob, kube.get("refitjobs", namespace, name))
        except NotFound:
            if seen_once:
                raise PluginError(f'refitjob "{name}" was deleted before it finished') from None
            raise
        seen_once = True
        if deadline is None:
            limit = timeout if timeout is not None else obj.spec.timeout_seconds + DEADLINE_GRACE_S
            deadline = started + limit
        jv = job_view(obj, rates, clock(), now())
        display.show(jv)
        if jv.outcome:
            out.write(final_line(jv) + "\n")
            out.flush()
            return 0 if jv.outcome == "Complete" else 1
        if clock() >= deadline:
            raise PluginError(
                f'timed out after {clock() - started:.0f}s waiting for refitjob "{name}" '
                f"(phase {jv.phase}, {jv.done}/{jv.count} targets done)"
            )
        sleep(max(MIN_INTERVAL_S, interval))


def refitjob_body(
    source: str,
    selector: dict[str, Any],
    version: str | None = None,
    name: str | None = None,
    strategy: dict[str, Any] | None = None,
    timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """A RefitJob; fields left out take the CRD's defaults. Its spec is checked with the
    API model first, so a bad flag is refused with the field named before anything is
    created."""
    meta = {"name": name} if name else {"generateName": f"{source}-refit-"}
    spec: dict[str, Any] = {"sourceRef": {"name": source}, "targets": selector}
    if version:
        spec["version"] = version
    if strategy:
        spec["strategy"] = strategy
    if timeout_seconds:
        spec["timeoutSeconds"] = timeout_seconds
    try:
        RefitJobSpec.from_wire(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PluginError(f"spec.{where}: {first['msg']}") from None
    return {"apiVersion": API_VERSION, "kind": RefitJob.KIND, "metadata": meta, "spec": spec}


# -- commands ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    namespace = None if args.all_namespaces else (args.namespace or kube.namespace)
    objects = {kind.PLURAL: kube.list(kind.PLURAL, namespace) for kind, *_ in KINDS}
    out.write("\n".join(status_lines(objects, _now(), namespace)) + "\n")
    return 0


def cmd_watch(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    name = args.name
    if "/" in args.kind:  # refitjob/NAME
        if name:
            raise PluginError("give either refitjob/NAME or refitjob NAME, not both")
        args.kind, name = args.kind.split("/", 1)
    if args.kind not in ("refitjob", "refitjobs", "rj", "refitjob.ferry.dev"):
        raise PluginError(f"can only watch refitjobs, not {args.kind!r}")
    if not name:
        raise PluginError("which refitjob? kubectl ferry watch refitjob NAME")
    return watch_job(kube, args.namespace or kube.namespace, name, out, args.interval, args.timeout)


def cmd_refit(args: argparse.Namespace, kube: Kube, out: TextIO) -> int:
    namespace = args.namespace or kube.namespace
    try:
        selector = parse_selector(args.targets)
        chunk = parse_quantity(args.chunk_bytes) if args.chunk_bytes else None
    except (SelectorError, ValueError) as exc:
        raise PluginError(str(exc)) from None
    strategy = {
        k: v
        for k, v in (
            ("type", args.strategy),
            ("maxFanOut", args.max_fan_out),
            ("chunkBytes", chunk),
        )
        if v
    }
    kube.get("weightsources", namespace, args.source)  # a clear NotFound before creating anything
    body = refitjob_body(
        args.source, selector, args.version, args.name, strategy, args.timeout_seconds
    )
    created = kube.create("refitjobs", namespace, body)
    name = created["metadata"]["name"]
    out.write(f"refitjob.ferry.dev/{name} created\n")
    out.flush()
    if args.no_watch:
        return 0
    return watch_job(kube, namespace, name, out, args.interval, args.timeout)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--kubeconfig",
        help="path to a kubeconfig (default: KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    common.add_argument("--context", help="kubeconfig context to use")
    common.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help=f"seconds between polls of the job (at least {MIN_INTERVAL_S})",
    )
    watching.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (exit 2) after this many seconds "
        f"(default: the job's spec.timeoutSeconds + {DEADLINE_GRACE_S:.0f})",
    )

    p = argparse.ArgumentParser(
        prog="kubectl ferry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "status", parents=[common], help="WeightSources, RefitJobs and ArtifactCaches at a glance"
    )
    s.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    s.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", parents=[common, watching], help="live progress of a RefitJob")
    w.add_argument("kind", help="refitjob (or rj), or refitjob/NAME")
    w.add_argument("name", nargs="?")
    w.set_defaults(func=cmd_watch)

    r = sub.add_parser("refit", parents=[common, watching], help="create a RefitJob and watch it")
    r.add_argument("source", help="WeightSource to copy from")
    r.add_argument(
        "--targets", required=True, help="label selector of the target pods, e.g. app=inference"
    )
    r.add_argument("--strategy", choices=["direct", "tree", "chain"])
    r.add_argument("--version", help="version to move (default: latest)")
    r.add_argument("--name", help="name of the RefitJob (default: generated, SOURCE-refit-xxxxx)")
    r.add_argument("--max-fan-out", type=int, help="most targets one source serves at a time")
    r.add_argument("--chunk-bytes", help="transfer chunk size, e.g. 64Mi")
    r.add_argument("--timeout-seconds", type=int, help="the job's deadline (spec.timeoutSeconds)")
    r.add_argument("--no-watch", action="store_true", help="create the job and return")
    r.set_defaults(func=cmd_refit)
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if args.namespace is not None and getattr(args, "all_namespaces", False):
            raise PluginError("give either -n NAMESPACE or -A, not both")
        kube = Kube.connect(args.kubeconfig, args.context)
        return int(args.func(args, kube, out))
    except ObjectInvalid as exc:  # a field this plugin's models refuse: name it
        out.flush()
        print(f"error: {exc} (is this kubectl-ferry older than the operator?)", file=sys.stderr)
        return 2
    except PluginError as exc:
        out.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130

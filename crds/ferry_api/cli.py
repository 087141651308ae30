"""The `ferry` command: one entry point, subcommands registered by each package.

Each subcommand module exposes `register(subparsers)`; they are imported
lazily so `ferry artifact ...` does not pay for torch or kopf.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module holding `register(subparsers)`
SUBCOMMANDS: dict[str, str] = {
    "operator": "ferry_operator.cli",
    "agent": "ferry_agent.cli",
    "artifact": "ferry_agent.artifacts.cli",
    "bench": "ferry_bench.cli",
    "dev": "ferry_dev.cli",
    "crds": "ferry_api.generate",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `ferry {name} --help`)")
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):
                raise
            sub.add_parser(name, help="(not available in this build)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        build_parser().parse_args([args.command, "--help"])
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

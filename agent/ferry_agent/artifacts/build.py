"""Regenerate the gRPC stubs next to artifacts.proto.

    python -m ferry_agent.artifacts.build            # rewrite the stubs
    python -m ferry_agent.artifacts.build --check    # exit 1 if they are stale

Stubs are generated relative to `agent/`, so they import each other as
`ferry_agent.artifacts.artifacts_pb2`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_ROOT = HERE.parent.parent
PROTO = HERE / "artifacts.proto"
STUBS = ("artifacts_pb2.py", "artifacts_pb2.pyi", "artifacts_pb2_grpc.py")


def generate(out_root: Path) -> dict[str, bytes]:
    """Run protoc into `out_root`; return {stub name: bytes}."""
    from ferry_agent.proto.build import run_protoc  # noqa: PLC0415

    rel = PROTO.relative_to(AGENT_ROOT)
    rc = run_protoc(
        [
            f"-I{AGENT_ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(rel),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    gen = out_root / rel.parent
    return {name: (gen / name).read_bytes() for name in STUBS}


def stale() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [
        n
        for n, data in fresh.items()
        if not (HERE / n).is_file() or (HERE / n).read_bytes() != data
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            print(
                f"stale gRPC stubs: {', '.join(names)}; run python -m ferry_agent.artifacts.build"
            )
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate(Path(tmp)).items():
            (HERE / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

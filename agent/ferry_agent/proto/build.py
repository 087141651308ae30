"""Regenerate the gRPC stubs: `python -m ferry_agent.proto.build`.

Compiles every `*.proto` here and in sibling `ferry_agent/*/proto/` folders
(e.g. the ArtifactCache service) into the folder that holds it. Stubs are
committed; tests/unit/agent/test_proto.py fails when they are stale. Imports
in the generated grpc modules are rewritten to be package-relative.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def proto_dirs() -> list[Path]:
    dirs = [HERE, *sorted(p for p in HERE.parent.glob("*/proto") if p.is_dir())]
    return [d for d in dirs if any(d.glob("*.proto"))]


def run_protoc(args: list[str]) -> int:
    """grpc_tools' protoc in a child process: its bundled protobuf C++ must not be
    loaded into a process that already holds NIXL/UCX (the two crash together)."""
    import grpc_tools  # the package only; its compiler extension loads in the child

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    return subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{include}", *args]
    ).returncode


def generate(src_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for path in sorted(src_dir.glob("*.proto")):
        proto = path.name
        rc = run_protoc(
            [
                f"-I{src_dir}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(path),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} ({rc})")
        stem = proto.removesuffix(".proto")
        grpc_py = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_py.read_text()
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.M)
        grpc_py.write_text(text)
        written += [out_dir / f"{stem}_pb2.py", grpc_py]
    return written


def stale() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    out = []
    for src in proto_dirs():
        with tempfile.TemporaryDirectory() as tmp:
            for f in generate(src, Path(tmp)):
                have = src / f.name
                if not have.exists() or have.read_text() != f.read_text():
                    out.append(str(have.relative_to(HERE.parent)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = ap.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            print("stale gRPC stubs: " + ", ".join(names), file=sys.stderr)
            return 1
        return 0
    for src in proto_dirs():
        for f in generate(src, src):
            print(f"wrote {f.relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wheel the images install (`pip install .`) ships every package and data file.

A bare top-level `packages` list once built a wheel with ferry_agent but without
ferry_agent.bench, .k8s, .proto ...: every image would have failed at import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"ferry_api": "crds", "ferry_operator": "operator", "ferry_agent": "agent"}
DATA = ("*.proto", "*.lua", "*.yaml")


def test_wheel_ships_every_subpackage_and_data_file(tmp_path):
    # What the Dockerfiles copy, built outside the checkout (setuptools writes build/).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in SOURCES.values():
        shutil.copytree(
            ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,  # the build/ tree setuptools leaves goes here, not into the checkout
        timeout=240,
    )
    (wheel,) = tmp_path.glob("ferry-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for pkg, top in SOURCES.items():
        base = ROOT / top
        for init in (base / pkg).rglob("__init__.py"):
            want.add(init.relative_to(base).as_posix())
        for pattern in DATA:
            for f in (base / pkg).rglob(pattern):
                if "__pycache__" not in f.parts:
                    want.add(f.relative_to(base).as_posix())
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {missing}"

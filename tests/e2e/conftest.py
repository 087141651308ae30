"""`cluster`: a DevCluster per test (real control plane, real operator, real agents);
`@pytest.mark.cluster(...)` passes its keyword arguments."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry_dev.cluster import DevCluster


@pytest.fixture()
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    marker = request.node.get_closest_marker("cluster")
    kw = dict(marker.kwargs) if marker else {}
    c = DevCluster(tmp_path / "dev", **kw)
    try:
        c.up()
        yield c
    finally:
        c.down()

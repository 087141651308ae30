"""A kwok cluster for scale tests: its own etcd and kube-apiserver (the session's
control plane runs no kube-controller-manager), plus kube-controller-manager,
kube-scheduler, kwok and fake 8-GPU nodes. Nothing is mocked but the agents, which
`ferry_bench.simagents` plays in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ferry_bench.control_plane import Bench

GPU_NODES = 16  # 128 GPUs: room for the 100-target test; the benchmark makes 125
SOURCES = 8


@pytest.fixture(scope="session")
def kwok_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    b = Bench(tmp_path_factory.mktemp("kwok"), GPU_NODES, SOURCES)
    try:
        yield b
    finally:
        b.close()

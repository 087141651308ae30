"""A NIXL pull that would run over TCP where a faster path exists says why (fallback.py)."""

from __future__ import annotations

import logging

import pytest

from ferry_agent.fallback import RDMA, RDMA_ALIASES, FallbackWarnings, Peer, reason, tls_allows

GPU0, GPU1 = "0000:18:00.0", "0000:2a:00.0"
HERE = Peer("boot-a", GPU0, "cuda")


def why(
    here: Peer, there: Peer, ipc: bool = True, rdma: tuple[str, ...] = (), **env: str
) -> str | None:
    return reason(here, there, ipc_copier=ipc, env=env, rdma=rdma)


@pytest.mark.parametrize(
    ("tls", "allowed"),
    [
        (None, True),
        ("", True),
        ("all", True),
        ("tcp", False),
        ("tcp,cuda_copy", False),
        ("cuda_ipc,tcp", True),
        ("cuda,tcp", True),
        ("^cuda_ipc", False),
        ("^cuda", False),
        ("^tcp", True),
        ("^cuda_copy", True),
    ],
)
def test_ucx_tls_lists_and_exclusions(tls, allowed):
    assert tls_allows(tls, ("cuda_ipc",), ("cuda",)) is allowed


@pytest.mark.parametrize(
    ("tls", "allowed"),
    [
        ("rc", True),
        ("rc_x,tcp", True),
        ("ib", True),
        ("tcp,sm", False),
        ("^rc", True),
        ("^rc,dc,ud", False),
        ("^ib", False),
    ],
)
def test_ucx_tls_rdma_prefixes(tls, allowed):
    assert tls_allows(tls, RDMA, RDMA_ALIASES) is allowed


def test_same_gpu_over_nixl_names_the_flag_and_the_fix():
    msg = why(HERE, Peer("boot-a", GPU0, "cuda"), ipc=False)
    assert (
        msg is not None and "--same-gpu nixl" in msg and "tcp/lo" in msg and "--same-gpu ipc" in msg
    )
    # with the CUDA IPC copier the pull does not go over NIXL (a refused open is ipc.py's warning)
    assert why(HERE, Peer("boot-a", GPU0, "cuda"), ipc=True) is None


def test_other_gpu_of_this_host_without_cuda_ipc_in_ucx_tls():
    there = Peer("boot-a", GPU1, "cuda")
    assert why(HERE, there) is None
    msg = why(HERE, there, UCX_TLS="tcp,cuda_copy")
    assert msg is not None and "UCX_TLS=tcp,cuda_copy" in msg and "cuda_ipc" in msg
    assert why(HERE, there, UCX_TLS="^cuda_ipc") is not None
    assert why(HERE, there, UCX_TLS="cuda_ipc,cuda_copy,tcp") is None


def test_host_memory_on_one_host_without_shared_memory_in_ucx_tls():
    here, there = Peer("boot-a", "", "host"), Peer("boot-a", "", "host")
    assert why(here, there) is None
    msg = why(here, there, UCX_TLS="tcp")
    assert msg is not None and "UCX_TLS=tcp" in msg and "shared memory" in msg and "add sm" in msg
    assert why(here, there, UCX_TLS="^cma") is None  # posix/sysv remain
    assert why(here, there, UCX_TLS="^sm") is not None


def test_across_hosts_only_where_this_node_has_rdma():
    here, there = Peer("boot-a", "", "host"), Peer("boot-b", "", "host")
    assert why(here, there, UCX_TLS="tcp") is None  # no RDMA device: TCP is the path there is
    rdma = ("mlx5_0", "mlx5_1")
    assert why(here, there, rdma=rdma) is None
    msg = why(here, there, rdma=rdma, UCX_TLS="tcp,sm")
    assert msg is not None and "mlx5_0, mlx5_1" in msg and "UCX_TLS=tcp,sm" in msg
    msg = why(here, there, rdma=rdma, UCX_NET_DEVICES="eth0")
    assert msg is not None and "UCX_NET_DEVICES=eth0" in msg
    assert why(here, there, rdma=rdma, UCX_NET_DEVICES="mlx5_1:1,eth0") is None


def test_each_reason_is_logged_once_per_source(caplog):
    w = FallbackWarnings(
        Peer("boot-a", "", "host"), ipc_copier=False, env={"UCX_TLS": "tcp"}, rdma=[]
    )
    there = Peer("boot-a", "", "host")
    with caplog.at_level(logging.WARNING, logger="ferry_agent.fallback"):
        for _ in range(3):
            assert w.check("10.0.0.1:7470", there) is not None
        w.check("10.0.0.2:7470", there)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("pull from 10.0.0.1:7470 falls back to TCP: ")

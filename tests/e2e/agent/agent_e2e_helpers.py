"""Helpers for agent e2e tests: mixed layouts, byte fill/snapshot, and a Cluster of agent processes."""

from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ferry_agent.client import EngineClient
from ferry_agent.layout import TensorSpec
from ferry_agent.peer import AgentClient
from ferry_dev.procs import AgentProcess, spawn_agent

DTYPES = ["float32", "bfloat16", "float16", "int8", "int64", "float8_e4m3fn", "uint8", "bool"]


def mixed_specs(n: int = 240, seed: int = 1, scale: int = 40_000) -> list[TensorSpec]:
    """n tensors of mixed dtypes, ranks and sizes (odd sizes: padding inside slabs; one empty)."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        dtype = DTYPES[i % len(DTYPES)]
        elems = int(rng.integers(1, scale))
        if i == 7:
            shape: tuple[int, ...] = (0, 16)
        elif i % 3 == 0:
            shape = (elems,)
        elif i % 3 == 1:
            shape = (max(1, elems // 64), 64)
        else:
            shape = (3, max(1, elems // 96), 32)
        specs.append(TensorSpec(f"model.layers.{i // 8}.p{i % 8}", dtype, shape))
    return specs


def fill(client: EngineClient, seed: int) -> dict[str, bytes]:
    """Random bytes into every tensor through the client's slab mapping; returns them."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in client.placements:
        data = rng.integers(0, 256, p.nbytes, dtype=np.uint8)
        client.slabs[p.slab].array[p.offset : p.offset + p.nbytes] = data
        out[p.name] = data.tobytes()
    return out


def snapshot(client: EngineClient) -> dict[str, bytes]:
    return {
        p.name: client.slabs[p.slab].array[p.offset : p.offset + p.nbytes].tobytes()
        for p in client.placements
    }


def paint(client: EngineClient, value: int) -> None:
    for s in client.slabs:
        s.array.fill(value)


class Cluster:
    """Agents started for the test; everything is stopped (and shm removed) at teardown."""

    def __init__(self, workdir: Path, token_file: Path):
        self.workdir = workdir
        self.token_file = token_file
        self.procs: list[AgentProcess] = []
        self.clients: list[EngineClient] = []
        self.rpcs: list[AgentClient] = []
        self.tag = secrets.token_hex(3)

    def agent(self, role: str, *args: str) -> AgentProcess:
        return self.spawn(role, args=list(args))

    def spawn(self, role: str, args: list[str] | None = None, **kw: Any) -> AgentProcess:
        """An agent for `role` (spawn_agent's keyword arguments: env, launcher, ...)."""
        pod = f"{role}-{self.tag}"
        argv = [
            "--slab-bytes",
            "4Mi",
            "--chunk-bytes",
            "1Mi",
            "--log-level",
            "WARNING",
            *(args or []),
        ]
        p = spawn_agent(self.workdir, pod, self.token_file, args=argv, timeout=30, **kw)
        self.procs.append(p)
        return p

    def engine(self, p: AgentProcess) -> EngineClient:
        return self.track(EngineClient(p.socket, timeout=30))

    def track(self, c: EngineClient) -> EngineClient:
        """Close `c` at teardown."""
        self.clients.append(c)
        return c

    def rpc(self, p: AgentProcess, token: str | None = None) -> AgentClient:
        c = AgentClient(p.endpoint, token or self.token_file.read_text().strip(), timeout=10)
        self.rpcs.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for r in self.rpcs:
            r.close()
        for p in self.procs:
            p.stop(timeout=10)
        for p in self.procs:
            for f in glob.glob(f"/dev/shm/ferry-{p.pod}_*"):
                os.unlink(f)

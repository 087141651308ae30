"""Two real agent processes (source and target, host memory, NIXL over loopback); the test
process is both the trainer (publishing into the source) and the engine (bound to the target)."""

from __future__ import annotations

import glob
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry_agent.client import EngineClient
from ferry_agent.layout import TensorSpec
from ferry_agent.peer import AgentClient
from ferry_agent.request import PullRequest
from ferry_dev.procs import AgentProcess, spawn_agent

sys.path.insert(0, str(Path(__file__).parent))  # engine_models (--import-mode=importlib)


@dataclass
class Agents:
    workdir: Path
    token_file: Path
    procs: dict[str, AgentProcess] = field(default_factory=dict)
    clients: list[Any] = field(default_factory=list)

    def start(self, role: str, *args: str) -> AgentProcess:
        pod = f"{role}-{secrets.token_hex(3)}"
        args = ("--slab-bytes", "4Mi", "--chunk-bytes", "1Mi", "--log-level", "WARNING", *args)
        p = spawn_agent(self.workdir, pod, self.token_file, args=list(args), timeout=60)
        self.procs[role] = p
        return p

    def engine(self, role: str) -> EngineClient:
        c = EngineClient(self.procs[role].socket, timeout=30)
        self.clients.append(c)
        return c

    def rpc(self, role: str) -> AgentClient:
        c = AgentClient(self.procs[role].endpoint, self.token_file.read_text().strip(), timeout=30)
        self.clients.append(c)
        return c

    def pull(self, **kw: Any) -> Any:
        """The target pulls whatever the source serves, pausing its engine first."""
        cancel = kw.pop("cancel", None)
        kw = {"quiesce": True, "timeout_s": 30, **kw}
        self._adopt()
        request = PullRequest([self.procs["src"].endpoint], **kw)
        return self.rpc("dst").pull(request, cancel=cancel)

    def _adopt(self) -> None:
        """What a fresh target's first pull does (pull.adopt_layout): take the source's
        layout, here by declaring it when the target holds another one."""
        with (
            EngineClient(self.procs["src"].socket) as s,
            EngineClient(self.procs["dst"].socket) as d,
        ):
            src = s.request("layout")
            if d.status()["fingerprint"] == src["fingerprint"]:
                return
            order = sorted(src["tensors"], key=lambda t: (t["slab"], t["offset"]))
            d.declare([TensorSpec.from_dict(t) for t in order])

    def fresh_target(self) -> None:
        """The agents serve the whole module; each test starts with a target holding no
        version (as a fresh replica would) in place of a new process (~5-30 s to start
        on a busy 2-core machine)."""
        with EngineClient(self.procs["dst"].socket, timeout=30) as c:
            c.declare([TensorSpec(f"reset.{secrets.token_hex(4)}", "uint8", (1,))])

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def close(self) -> None:
        self.close_clients()
        for p in self.procs.values():
            p.stop(timeout=10)
        for p in self.procs.values():
            for f in glob.glob(f"/dev/shm/ferry-{p.pod}-*"):
                os.unlink(f)


@pytest.fixture(scope="module")
def agent_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    workdir = tmp_path_factory.mktemp("agents")
    token = workdir / "token"
    token.write_text(secrets.token_hex(16))
    a = Agents(workdir, token)
    try:
        a.start("src")
        a.start("dst")
        yield a
    finally:
        a.close()


@pytest.fixture
def agents(agent_procs: Agents) -> Iterator[Agents]:
    """The module's agents, the target reset to a layout no test uses (it holds no
    version, like a fresh replica; `pull` gives it the source's layout), and every
    engine connection closed after the test."""
    agent_procs.fresh_target()
    try:
        yield agent_procs
    finally:
        agent_procs.close_clients()

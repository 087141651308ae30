"""Start agents as local processes with a pod's identity (tests, bench, `ferry dev`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class AgentProcess:
    pod: str
    proc: subprocess.Popen
    ready: dict[str, Any]
    socket: str
    log_path: Path

    @property
    def endpoint(self) -> str:
        return str(self.ready["endpoint"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to clean up (crash test)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def spawn_agent(
    workdir: str | Path,
    pod: str,
    token_file: str | Path,
    *,
    namespace: str = "default",
    pod_ip: str = "127.0.0.1",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    launcher: list[str] | None = None,
) -> AgentProcess:
    """Run `ferry agent run` for `pod` (free ports, socket under workdir) and wait until it
    serves. `launcher` replaces `python -m ferry_agent.cli` (it gets `run ...` appended)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ready_file = workdir / f"{pod}.ready.json"
    ready_file.unlink(missing_ok=True)
    sock = str(workdir / f"{pod}.sock")
    log_path = workdir / f"{pod}.log"
    penv = {
        **os.environ,
        "POD_NAME": pod,
        "POD_NAMESPACE": namespace,
        "POD_IP": pod_ip,
        **(env or {}),
    }
    cmd = [
        *(launcher or [sys.executable, "-m", "ferry_agent.cli"]),
        "run",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--grpc-host",
        pod_ip,
        "--control-socket",
        sock,
        "--token-file",
        str(token_file),
        "--ready-file",
        str(ready_file),
        *(args or []),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=penv)
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"agent {pod} did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    return AgentProcess(pod, proc, json.loads(ready_file.read_text()), sock, log_path)

"""The operator as a local process (tests, `ferry dev`, the demo), started healthy or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .controlplane import REPO_ROOT, free_port


@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    health_url: str
    log: Path

    def healthz(self) -> int:
        return self._status("/healthz")

    def readyz(self) -> int:
        return self._status("/readyz")

    def _status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.health_url}{path}", timeout=3) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.health_url}/metrics", timeout=3) as r:
            return r.read().decode()

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_operator(
    kubeconfig: Path,
    log: Path,
    *extra: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    namespaces: list[str] | None = None,
) -> OperatorProcess:
    """`ferry operator run --all-namespaces` (or `--namespace` for each of `namespaces`) in
    its own session; returns once /healthz is 200. `env` adds variables (e.g.
    POD_NAMESPACE, where the webhook's serving Secret lives)."""
    scope = [f"--namespace={n}" for n in namespaces] if namespaces else ["--all-namespaces"]
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **(env or {})}
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry_operator", "run", *scope, "--health-port", str(port), *extra],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    op = OperatorProcess(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if op.healthz() == 200:
            return op
        time.sleep(0.3)
    op.stop(kill=True)
    raise RuntimeError(f"operator not healthy in {timeout:.0f}s:\n{log.read_text()[-4000:]}")

"""A restarted agent reclaims the host slabs its dead predecessor left in the pod's
/dev/shm (an emptyDir that outlives container restarts). In a container the agent is
PID 1 in its own PID namespace, so a new agent has the PID the old one had: the test
runs both generations as PID 1 (`unshare --pid`), killing the first with SIGKILL."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

import pytest

from ferry_dev.procs import spawn_agent

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]


def _slabs(pod: str) -> set[str]:
    return {os.path.basename(p) for p in glob.glob(f"/dev/shm/ferry-{pod}_*")}


def test_agent_restarted_as_pid_1_frees_the_slabs_of_the_one_it_replaces(tmp_path, token_file):
    pod = f"restart-{os.getpid()}"
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps([{"name": f"w{i}", "dtype": "float32", "shape": [1 << 18]} for i in range(4)])
    )

    # PID 1 in a new PID namespace, as in a container; when unshare ends, the agent gets
    # `signal` (SIGKILL: a crash, no clean-up; SIGTERM: a clean stop)
    def as_pid_1(signal: str) -> list[str]:
        return [
            "unshare",
            "--pid",
            "--fork",
            f"--kill-child={signal}",
            sys.executable,
            "-m",
            "ferry_agent.cli",
        ]

    args = ["--layout", str(layout), "--slab-bytes", "1Mi", "--log-level", "WARNING"]
    try:
        first = spawn_agent(
            tmp_path / "g1", pod, token_file, args=args, launcher=as_pid_1("SIGKILL")
        )
        assert first.ready["pid"] == 1
        left = _slabs(pod)
        assert left, "the first agent's slabs"
        first.kill()  # a crash: its slabs stay in /dev/shm
        time.sleep(1.0)
        assert _slabs(pod) == left

        second = spawn_agent(
            tmp_path / "g2", pod, token_file, args=args, launcher=as_pid_1("SIGTERM")
        )
        assert second.ready["pid"] == 1
        now = _slabs(pod)
        assert now and not now & left, f"left behind: {sorted(now & left)}"
        second.stop()  # unshare ends at once; the agent cleans up after it
        deadline = time.monotonic() + 15
        while _slabs(pod) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _slabs(pod), "a clean stop removes its own slabs"
    finally:
        for f in glob.glob(f"/dev/shm/ferry-{pod}_*"):
            os.unlink(f)

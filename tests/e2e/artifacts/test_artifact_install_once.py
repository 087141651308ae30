"""Eight ranks of one pod (separate processes) install one cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artifact_helpers import make_tree, snapshot

from ferry_agent.artifacts import pack

pytestmark = pytest.mark.e2e
RANKS = 8
WORKER = Path(__file__).with_name("once_worker.py")


def run_ranks(archive: Path, into: Path, sync: Path, *extra: str) -> tuple[list[dict], float]:
    sync.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--archive",
                str(archive),
                "--into",
                str(into),
                "--sync",
                str(sync),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RANKS)
    ]
    deadline = time.monotonic() + 60
    while len(list(sync.glob("ready-*"))) < RANKS:
        assert time.monotonic() < deadline, "ranks did not start"
        assert all(p.poll() is None for p in procs), [
            p.communicate() for p in procs if p.poll() is not None
        ]
        time.sleep(0.01)
    t0 = time.time()
    (sync / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results, t0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("once")
    tree = make_tree(base / "src", small=300, large=2, large_size=2 << 20)
    return tree, pack(tree, base / "cache.ferry").path


def test_one_rank_installs_the_others_wait_and_succeed(artifact, tmp_path: Path):
    tree, archive = artifact
    into = tmp_path / "pod" / "triton-cache"
    hold = 1.0
    results, t0 = run_ranks(archive, into, tmp_path / "sync", "--hold", str(hold))

    states = sorted(r["state"] for r in results)
    assert states == ["installed"] + ["present"] * (RANKS - 1), results
    assert sum(r["attempted"] for r in results) == 1
    installer = next(r for r in results if r["state"] == "installed")
    # The others really waited for the installer rather than returning early.
    assert all(r["end"] >= t0 + hold for r in results), results
    assert max(r["end"] for r in results) - installer["end"] < 2.0
    assert snapshot(into) == snapshot(tree)


def test_after_a_failure_all_ranks_give_up_within_the_ttl(artifact, tmp_path: Path):
    _, good = artifact
    raw = bytearray(good.read_bytes())
    raw[1000] ^= 0xFF  # the installer fails on a crc32c mismatch
    broken = tmp_path / "broken.ferry"
    broken.write_bytes(bytes(raw))
    into = tmp_path / "pod" / "triton-cache"
    hold, ttl = 1.5, 20.0
    results, t0 = run_ranks(broken, into, tmp_path / "sync", "--hold", str(hold), "--ttl", str(ttl))

    states = sorted(r["state"] for r in results)
    assert states == ["failed"] + ["gave_up"] * (RANKS - 1), results
    assert sum(r["attempted"] for r in results) == 1
    failed = next(r for r in results if r["state"] == "failed")
    assert failed["reason"].startswith("crc-mismatch")
    assert all(
        "failed recently: crc-mismatch" in r["reason"] for r in results if r["state"] == "gave_up"
    )
    wall = max(r["end"] for r in results) - t0
    # One attempt plus scheduling slack; serial retries would take RANKS * hold = 12 s.
    assert wall < hold + 1.5, wall
    assert wall < ttl
    assert sorted(p.name for p in into.iterdir()) == [".ferry"]

"""install_once state machine, in one process with a fake clock.

The cross-process behaviour (8 ranks, real locks) is in tests/e2e/artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry_agent.artifacts import install_once

KEY = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def boom():
    raise RuntimeError("peer vanished\nsecond line is dropped")


def test_success_is_recorded_and_seen_by_later_calls(tmp_path: Path):
    calls = []
    first = install_once(tmp_path, KEY, lambda: calls.append(1))
    second = install_once(tmp_path, KEY, lambda: calls.append(2))
    assert (first.state, second.state) == ("installed", "present")
    assert first.ok and second.ok and calls == [1]


def test_failure_is_final_within_the_ttl_then_retried_then_capped(tmp_path: Path):
    clock = Clock()
    kw = {"failure_ttl": 30.0, "max_attempts": 2, "clock": clock}
    calls = []

    def failing():
        calls.append(clock.t)
        boom()

    r1 = install_once(tmp_path, KEY, failing, **kw)
    assert r1.state == "failed" and r1.attempts == 1 and r1.reason == "peer vanished"
    clock.t += 29
    r2 = install_once(tmp_path, KEY, failing, **kw)
    assert r2.state == "gave_up" and "failed recently: peer vanished" in r2.reason
    clock.t += 2  # TTL over: one more attempt is allowed
    r3 = install_once(tmp_path, KEY, failing, **kw)
    assert r3.state == "failed" and r3.attempts == 2
    clock.t += 3600  # capped: no attempt even long after the TTL
    r4 = install_once(tmp_path, KEY, failing, **kw)
    assert r4.state == "gave_up" and "2 attempts failed" in r4.reason
    assert len(calls) == 2
    assert not r1.ok and not r4.ok


def test_crashed_attempt_counts_against_the_cap(tmp_path: Path):
    state = tmp_path / ".ferry"
    state.mkdir()
    (state / f"state-{KEY}.json").write_text(json.dumps({"status": "attempting", "attempts": 3}))
    r = install_once(tmp_path, KEY, lambda: None, max_attempts=3)
    assert r.state == "gave_up" and "3 attempts" in r.reason
    (state / f"state-{KEY}.json").write_text(json.dumps({"status": "attempting", "attempts": 1}))
    assert install_once(tmp_path, KEY, lambda: None, max_attempts=3).state == "installed"


def test_stale_staging_of_a_crashed_rank_is_removed(tmp_path: Path):
    stale = tmp_path / ".ferry" / "tmp-dead"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x" * 10)
    install_once(tmp_path, KEY, lambda: None)
    assert not stale.exists()


def test_keys_must_be_manifest_ids(tmp_path: Path):
    with pytest.raises(ValueError, match="hex manifest id"):
        install_once(tmp_path, "../../etc", lambda: None)


def test_state_dir_that_is_a_symlink_is_refused(tmp_path: Path):
    from ferry_agent.artifacts import ArtifactRejected

    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".ferry").symlink_to(outside)
    with pytest.raises(ArtifactRejected, match="reserved-path"):
        install_once(cache, KEY, lambda: None)
    assert list(outside.iterdir()) == []

"""Install once per pod: one rank installs, the others wait for its outcome.

Every rank of a pod (one process per GPU) may call `install_once` on the
same cache dir. An fcntl lock on `<into>/.ferry/lock` picks one installer;
the kernel drops it if that process dies. The outcome is recorded in
`<into>/.ferry/state-<key>.json`:

- `installed`: everyone returns at once.
- `failed` with `until` (now + `failure_ttl`): every rank that sees it gives up
  at once instead of taking the lock and trying again, so N ranks cost one
  attempt, not N serial timeouts. After the TTL one rank may try again.
- `attempting`: left behind only by a crashed installer; counts as an attempt.

After `max_attempts` attempts, ranks give up immediately until the marker is
removed (or the manifest, hence the key, changes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ferry_agent.artifacts.archive import read_trailer
from ferry_agent.artifacts.install import clean_stale_staging, install, state_dir

INSTALLED, PRESENT, FAILED, GAVE_UP = "installed", "present", "failed", "gave_up"
_KEY = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True)
class OnceResult:
    """What this rank saw: `installed` (it installed), `present` (another rank
    did), `failed` (its own attempt failed), `gave_up` (a recent failure, the
    attempt cap or the wait timeout). Only the first two mean a warm cache."""

    state: str
    key: str
    attempts: int
    reason: str = ""
    waited_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state in (INSTALLED, PRESENT)


def _read_state(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read() or b"null")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": FAILED, "attempts": 0, "until": 0, "reason": "unreadable state marker"}
    return data if isinstance(data, dict) else None


def _write_state(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def install_once(
    into: str | os.PathLike[str],
    key: str,
    do_install: Callable[[], object],
    *,
    failure_ttl: float = 30.0,
    max_attempts: int = 3,
    wait_timeout: float = 900.0,
    poll_interval: float = 0.05,
    clock: Callable[[], float] = time.time,
) -> OnceResult:
    """Run `do_install()` at most once per (cache dir, key) across processes.

    `key` is the manifest id. `do_install` raises on failure; whatever it
    raises is recorded as the reason (first line, truncated).
    """
    if not _KEY.match(key):
        raise ValueError(f"install key {key!r} must be a hex manifest id")
    state = state_dir(into)
    marker = state / f"state-{key}.json"
    start = time.monotonic()

    def result(status: str, attempts: int, reason: str = "") -> OnceResult:
        return OnceResult(status, key, attempts, reason, time.monotonic() - start)

    def decided(data: dict | None, locked: bool) -> OnceResult | None:
        if data is None:
            return None
        status, attempts = data.get("status"), int(data.get("attempts", 0))
        if status == INSTALLED:
            return result(PRESENT, attempts)
        if status == FAILED or (status == "attempting" and locked):
            # An "attempting" marker seen under the lock was left by a crashed rank.
            reason = str(data.get("reason", "crashed during install"))
            if attempts >= max_attempts:
                return result(GAVE_UP, attempts, f"{attempts} attempts failed; last: {reason}")
            if status == FAILED and clock() < float(data.get("until", 0)):
                return result(GAVE_UP, attempts, f"failed recently: {reason}")
        return None

    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = start + wait_timeout
        while True:
            seen = decided(_read_state(marker), locked=False)
            if seen is not None:
                return seen
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    return result(GAVE_UP, 0, f"waited {wait_timeout:.0f}s for the installing rank")
                time.sleep(poll_interval)
                continue
            try:
                data = _read_state(marker)
                seen = decided(data, locked=True)
                if seen is not None:
                    return seen
                attempts = int((data or {}).get("attempts", 0)) + 1
                clean_stale_staging(into)
                _write_state(
                    marker, {"status": "attempting", "attempts": attempts, "pid": os.getpid()}
                )
                try:
                    do_install()
                except Exception as exc:  # noqa: BLE001 - any failure is recorded, not retried here
                    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                    _write_state(
                        marker,
                        {
                            "status": FAILED,
                            "attempts": attempts,
                            "until": clock() + failure_ttl,
                            "reason": reason,
                        },
                    )
                    return result(FAILED, attempts, reason)
                _write_state(marker, {"status": INSTALLED, "attempts": attempts})
                return result(INSTALLED, attempts)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def install_archive_once(
    archive: str | os.PathLike[str],
    into: str | os.PathLike[str],
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
    **once_kw,
) -> OnceResult:
    """`install` under `install_once`, keyed by the archive's manifest id."""
    key = expected_id or read_trailer(archive).manifest_id
    return install_once(
        into,
        key,
        lambda: install(archive, into, pubkey=pubkey, expected_id=key, max_bytes=max_bytes),
        **once_kw,
    )

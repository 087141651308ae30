"""One "rank" of a pod for the install-once test; run as a separate process.

Waits for the test's go-file so that all ranks start together, then calls
install_once and prints one JSON line with what it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ferry_agent.artifacts import install, install_once
from ferry_agent.artifacts.archive import read_trailer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--archive", required=True)
    p.add_argument("--into", required=True)
    p.add_argument("--sync", required=True, help="dir for ready/go files")
    p.add_argument(
        "--hold", type=float, default=0.0, help="seconds the installer works before installing"
    )
    p.add_argument("--ttl", type=float, default=30.0)
    p.add_argument("--max-attempts", type=int, default=3)
    args = p.parse_args()

    key = read_trailer(args.archive).manifest_id
    attempted = []

    def do_install() -> None:
        attempted.append(time.time())
        time.sleep(args.hold)
        install(args.archive, args.into, expected_id=key)

    sync = Path(args.sync)
    (sync / f"ready-{os.getpid()}").touch()
    while not (sync / "go").exists():
        time.sleep(0.005)
    result = install_once(
        args.into,
        key,
        do_install,
        failure_ttl=args.ttl,
        max_attempts=args.max_attempts,
        wait_timeout=60,
    )
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "state": result.state,
                "reason": result.reason,
                "attempts": result.attempts,
                "attempted": bool(attempted),
                "end": time.time(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

"""What this agent's job runner does next, as a pure function of its Lease (decide).

Given the assignments and reports on the pod's own Lease (ferry_api.leases), the
attempt running now, the attempts taken here and the jobs finished here, `decide`
says: cancel the running attempt (its assignment went or moved on), fail attempts
it will not run (left Pulling by a previous run of this agent, or an assignment it
cannot validate), start the oldest new one, and prune old reports. The JobRunner
(jobs.py) carries it out: Lease I/O and attempt threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ferry_api import leases
from ferry_api.leases import Assignment, Report

# Reports kept on the Lease after their assignment is gone, newest first: a deleted
# job's finalizer folds the cancellation into the job (a downstream finds its
# upstream's endpoint in its own assignment, or here while it is kept).
KEEP_REPORTS = 8


@dataclass(frozen=True)
class Running:
    """The attempt this agent runs now."""

    uid: str
    attempt: int


@dataclass(frozen=True)
class Fail:
    """An attempt to report Failed without running it."""

    uid: str
    attempt: int
    reason: str
    message: str


@dataclass(frozen=True)
class Next:
    """What the job runner does next (decide): cancel the running attempt, fail attempts
    it will not run, start one, prune old reports; `seen` is job uid -> the highest
    attempt taken here (started or failed), after this step."""

    cancel: bool = False
    fail: tuple[Fail, ...] = ()
    start: tuple[str, Assignment] | None = None
    prune: tuple[str, ...] = ()
    seen: Mapping[str, int] = field(default_factory=dict)


def decide(
    annotations: Mapping[str, str],
    running: Running | None,
    seen: Mapping[str, int],
    finished: Sequence[str],
    keep: int = KEEP_REPORTS,
) -> Next:
    """The job runner's decision over this pod's Lease annotations (pure): given the
    assignments and reports there, what runs (`running`), the attempts taken here
    (`seen`) and the jobs finished here (oldest first)."""
    assigned = leases.read(dict(annotations), leases.ASSIGN)
    reports = {u: Report.parse(r) for u, r in leases.read(dict(annotations), leases.REPORT).items()}
    cancel = False
    if running is not None:
        now = assigned.get(running.uid)
        # The job ended or was deleted, or the attempt was re-assigned under us.
        cancel = now is None or leases.attempt_of(now) > running.attempt
    prune = _prunable(assigned, list(reports), running, finished, keep)
    seen = dict(seen)
    if running is not None:
        return Next(cancel, (), None, prune, seen)
    fails: list[Fail] = []
    for uid, raw in sorted(assigned.items(), key=lambda kv: str(kv[1].get("startTime"))):
        number, mine = leases.attempt_of(raw), reports.get(uid)
        if number < 1:
            continue
        if (
            mine is not None
            and mine.phase == "Pulling"
            and mine.attempt == number
            and seen.get(uid, 0) < number
        ):
            # A previous run of this agent (killed or restarted) took this attempt: nobody
            # pulls it now. Fail it, so that the operator retries it and a deleted job's
            # finalizer is not held for a pull that cannot end.
            seen[uid] = number
            fails.append(
                Fail(
                    uid,
                    number,
                    "AgentRestarted",
                    "the agent restarted during this attempt; its slabs hold no version",
                )
            )
            continue
        answered = mine.attempt if mine is not None and mine.final else 0
        if number <= max(seen.get(uid, 0), answered):
            continue
        seen[uid] = number
        try:
            return Next(False, tuple(fails), (uid, Assignment.from_annotation(raw)), prune, seen)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            fails.append(
                Fail(
                    uid,
                    number,
                    "InvalidAssignment",
                    f"assignment field {where}: {first['msg']} (operator and agent versions differ?)",
                )
            )
    return Next(False, tuple(fails), None, prune, seen)


def _prunable(
    assigned: Mapping[str, Any],
    reports: list[str],
    running: Running | None,
    finished: Sequence[str],
    keep: int,
) -> tuple[str, ...]:
    """The reports whose assignment is gone (the operator folded them, or the job ended)
    beyond the `keep` newest: oldest first, those of a previous run of this agent, then
    in the order finished here."""
    gone = [u for u in reports if u not in assigned and (running is None or running.uid != u)]
    gone.sort(key=lambda u: finished.index(u) if u in finished else -1)
    return tuple(gone[: max(0, len(gone) - keep)])

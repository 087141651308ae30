"""Kubernetes-style conditions as pure functions over plain dicts (wire form)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_str(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def set_conditions(
    existing: list[dict] | None, wanted: list[Cond], generation: int | None, now: datetime
) -> list[dict]:
    """New condition list: lastTransitionTime moves only when status flips.

    Conditions of other types already present are kept, so that another writer's
    condition (if any) is not dropped.
    """
    by_type = {c["type"]: c for c in existing or []}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for cond in wanted:
        old = by_type.pop(cond.type, None)
        changed = old is None or old.get("status") != cond.status_str
        entry = {
            "type": cond.type,
            "status": cond.status_str,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": stamp if changed or old is None else old["lastTransitionTime"],
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    out.extend(by_type.values())
    return out


def transitions(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Conditions whose status or reason changed (one Event each)."""
    before = {c["type"]: (c.get("status"), c.get("reason")) for c in old or []}
    return [c for c in new if before.get(c["type"]) != (c["status"], c["reason"])]


def get(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict] | None, type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c.get("status") == "True"


def human_bytes(n: int | None) -> str | None:
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"

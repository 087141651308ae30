"""Kubernetes-style conditions as pure functions: as API models, or in wire form."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ferry_api.meta import Condition, condition_is_true, find_condition


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_str(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def condition_models(
    existing: Sequence[Condition | dict[str, Any]] | None,
    wanted: list[Cond],
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """The new condition list: lastTransitionTime moves only when status flips.

    Conditions of other types already present are kept, so that another writer's
    condition (if any) is not dropped.
    """
    by_type = {c.type: c for c in (_model(c) for c in existing or [])}
    now = now.replace(microsecond=0)  # metav1.Time: whole seconds
    out = []
    for cond in wanted:
        old = by_type.pop(cond.type, None)
        changed = old is None or old.status != cond.status_str
        out.append(
            Condition(
                type=cond.type,
                status=cond.status_str,  # type: ignore[arg-type]
                reason=cond.reason,
                message=cond.message,
                last_transition_time=now if changed or old is None else old.last_transition_time,
                observed_generation=generation,
            )
        )
    out.extend(by_type.values())
    return out


def _model(c: Condition | dict[str, Any]) -> Condition:
    return c if isinstance(c, Condition) else Condition.model_validate(c)


def set_conditions(
    existing: list[dict] | None, wanted: list[Cond], generation: int | None, now: datetime
) -> list[dict]:
    """condition_models in wire form; another writer's conditions are kept as they are."""
    mine = {c.type for c in wanted}
    ours = [c for c in existing or [] if c.get("type") in mine]
    return [c.wire() for c in condition_models(ours, wanted, generation, now)] + [
        c for c in existing or [] if c.get("type") not in mine
    ]


def transitions(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Conditions whose status or reason changed (one Event each)."""
    before = {c["type"]: (c.get("status"), c.get("reason")) for c in old or []}
    return [c for c in new if before.get(c["type"]) != (c["status"], c["reason"])]


get = find_condition
is_true = condition_is_true


def human_bytes(n: int | None) -> str | None:
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"

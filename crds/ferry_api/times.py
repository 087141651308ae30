"""Kubernetes timestamps, parsed and written in one place.

The apiserver writes RFC 3339 in UTC with a `Z` (`metav1.Time`: seconds;
`metav1.MicroTime`, a Lease's renewTime: microseconds). Python's
`datetime.fromisoformat` reads `Z` only from 3.11 on and refuses a naive time
nowhere, so every reader goes through `parse`, and every writer through `stamp`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now() -> datetime:
    """The clock the operator stamps with: UTC, whole seconds (metav1.Time's precision)."""
    return datetime.now(UTC).replace(microsecond=0)


def parse(value: Any) -> datetime | None:
    """An aware UTC datetime from a Kubernetes timestamp (or a datetime); None when
    absent or not a timestamp (a value anyone could edit must not crash the reader)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def stamp(t: datetime, micro: bool = False) -> str:
    """`t` as the apiserver writes it: `2026-01-01T00:00:00Z` (metav1.Time) or, with
    `micro`, `2026-01-01T00:00:00.000000Z` (metav1.MicroTime)."""
    t = t.astimezone(UTC) if t.tzinfo else t
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")

"""`ferry bench control-plane`: a RefitJob over N simulated targets on kwok nodes (issue 8)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("control-plane", help="RefitJob over N simulated targets (not built yet)")
    p.set_defaults(func=lambda args: 2)

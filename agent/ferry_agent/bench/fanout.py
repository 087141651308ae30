"""`ferry bench fanout`: predicted refit time for N GPUs per strategy (issue 8)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("fanout", help="fan-out model (not built yet)")
    p.set_defaults(func=lambda args: 2)

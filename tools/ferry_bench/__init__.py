"""Benchmarks: separate from tests, print JSON, measure against a same-run baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None = None, *, compact: bool = False) -> None:
    """Print a benchmark's JSON object (one line when `compact`) and, with `out`, also
    write it there indented, as the committed results under docs/bench/ are."""
    print(json.dumps(result, indent=None if compact else 2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")

"""Where the dev tools find the checkout they run from (hack/ scripts, examples/).

The tools are not installed into images or run from a wheel: they run from a Ferry
checkout, installed editable (`make setup`). `FERRY_REPO` names another checkout.
"""

from __future__ import annotations

import os
from pathlib import Path


def _repo_root() -> Path:
    given = os.environ.get("FERRY_REPO")
    root = Path(given) if given else Path(__file__).resolve().parents[2]
    if not (root / "hack" / "envtest.sh").exists():
        raise RuntimeError(
            f"{root} is not a Ferry checkout (no hack/envtest.sh): run the dev tools from one, "
            "or set FERRY_REPO to it"
        )
    return root


REPO_ROOT = _repo_root()

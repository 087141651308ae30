"""The WeightSource status as applied is pinned: for every input the unit tests feed
compute_status (plus a few more: a second reconcile over the first one's output, another
writer's condition, a state from a newer agent, a failed local rank, a rolling update),
its wire form equals the one recorded from the dict-building handler it replaced."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ferry_api.weightsource import WeightSourceSpec
from ferry_operator.handlers import weightsource

CASES = json.loads((Path(__file__).parent / "golden" / "weightsource_status.json").read_text())


def _wire(status: Any) -> dict:
    return status.wire() if hasattr(status, "wire") else status


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_wire_form_unchanged(case: dict) -> None:
    inp = case["input"]
    got = weightsource.compute_status(
        WeightSourceSpec.model_validate(inp["spec"]),
        inp["status"],
        inp["generation"],
        inp["pods"],
        datetime.fromisoformat(inp["now"]),
        None if inp["live"] is None else set(inp["live"]),
    )
    wire = json.loads(json.dumps(_wire(got)))
    assert json.dumps(wire, sort_keys=True) == json.dumps(case["wire"], sort_keys=True)

"""target_specs: the tensors a fresh target declares before its first reshard pull."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from reshard_sim import model, shard_specs  # noqa: E402

from ferry_agent.errors import LayoutMismatch  # noqa: E402
from ferry_agent.layout import plan_layout  # noqa: E402
from ferry_agent.transform.reshard import target_specs  # noqa: E402


def _sources(shapes: dict, tp: int) -> list:
    return [plan_layout(shard_specs(shapes, r, tp), 1 << 16).placements for r in range(tp)]


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_target_shapes_are_those_of_a_direct_load(src_tp: int, dst_tp: int) -> None:
    shapes = model(hidden=256, inter=512)
    got = {s.name: s for s in target_specs(_sources(shapes, src_tp), target_tp=dst_tp)}
    for rank in range(dst_tp):
        assert got == {s.name: s for s in shard_specs(shapes, rank, dst_tp)}


def test_a_split_that_does_not_divide_is_a_layout_mismatch() -> None:
    shapes = {"model.layers.0.mlp.up_proj.weight": ("bfloat16", (6, 4))}
    with pytest.raises(LayoutMismatch, match="up_proj"):
        target_specs(_sources(shapes, 1), target_tp=4)


def test_a_scalar_column_parallel_shard_is_a_layout_mismatch():
    from ferry_agent.layout import TensorSpec

    spec = TensorSpec("model.layers.0.self_attn.q_proj.weight", "bfloat16", ())
    shard = plan_layout([spec], 1 << 16).placements
    with pytest.raises(LayoutMismatch, match="no dim 0"):
        target_specs([shard, shard], target_tp=1)

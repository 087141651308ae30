"""TP reshard planning: the plan, executed on plain byte buffers, gives exactly a direct load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from reshard_sim import direct_load, full_weights, model, shard_specs, simulate  # noqa: E402

from ferry_agent.errors import LayoutMismatch  # noqa: E402
from ferry_agent.layout import plan_layout  # noqa: E402
from ferry_agent.transform.reshard import (  # noqa: E402
    COLUMN,
    REPLICATED,
    ROW,
    plan_reshard,
    rule_for,
)


def test_rule_table_by_name():
    assert rule_for("model.layers.3.self_attn.q_proj.weight") == COLUMN
    assert rule_for("model.layers.3.self_attn.q_proj.bias") == COLUMN
    assert rule_for("model.layers.3.mlp.gate_up_proj.weight") == COLUMN
    assert rule_for("model.embed_tokens.weight") == COLUMN
    assert rule_for("model.layers.3.self_attn.o_proj.weight") == ROW
    assert rule_for("model.layers.3.mlp.down_proj.weight") == ROW
    assert rule_for("layers.0.wo") == ROW
    assert rule_for("model.layers.3.post_attention_layernorm.weight") == REPLICATED


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 4), (4, 1)])
def test_every_rank_gets_exactly_its_direct_load(src_tp, dst_tp):
    shapes = model()
    full = full_weights(shapes, seed=src_tp * 10 + dst_tp)
    for rank in range(dst_tp):
        got, plan, _ = simulate(shapes, full, src_tp, rank, dst_tp)
        want = direct_load(full, rank, dst_tp)
        assert set(got) == set(want)
        for name, w in want.items():
            assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
            assert torch.equal(got[name].view(torch.uint8), w.view(torch.uint8)), name


def test_column_pieces_are_direct_and_row_pieces_use_scratch_only_when_strided():
    shapes = model(layers=1)
    full = full_weights(shapes, seed=1)
    _, plan21, _ = simulate(shapes, full, 2, 0, 1)
    kinds = {(p.name.rsplit(".", 2)[-2], p.direct) for p in plan21.pieces}
    assert ("q_proj", True) in kinds and ("q_proj", False) not in kinds
    assert ("o_proj", False) in kinds and ("o_proj", True) not in kinds
    # TP2 -> TP1 o_proj: each source shard is read whole (covering range == shard)
    o = [p for p in plan21.scratch if p.name.endswith("o_proj.weight")]
    assert len(o) == 2 and all(p.nbytes == 256 * 128 * 2 for p in o)
    # same TP: nothing strided, no scratch at all
    _, plan22, _ = simulate(shapes, full, 2, 1, 2)
    assert plan22.scratch_bytes == 0 and not plan22.scratch


def test_same_tp_coalesces_to_few_segments():
    shapes = model(layers=4)
    full = full_weights(shapes, seed=2)
    _, plan, segs = simulate(shapes, full, 2, 0, 2, chunk_bytes=1 << 30)
    slabs = len(plan_layout(shard_specs(shapes, 0, 2), 1 << 16).slab_sizes)
    assert len(segs) == slabs  # one descriptor per slab, not one per tensor
    assert len(plan.pieces) == len(shapes)


def test_mismatches_are_reported_by_name():
    shapes = model(layers=1)
    src = [plan_layout(shard_specs(shapes, r, 2), 1 << 16).placements for r in range(2)]
    bad = dict(shapes)
    bad["model.layers.0.self_attn.q_proj.weight"] = ("bfloat16", (256, 200))
    dst = plan_layout(shard_specs(bad, 0, 1), 1 << 16).placements
    with pytest.raises(LayoutMismatch) as exc:
        plan_reshard(src, dst, target_rank=0, target_tp=1)
    assert "q_proj.weight" in str(exc.value)
    missing = plan_layout(shard_specs(shapes, 0, 1), 1 << 16).placements
    with pytest.raises(LayoutMismatch, match="missing on source ranks"):
        plan_reshard([src[0], src[1][1:]], missing, target_rank=0, target_tp=1)

"""A model, its TP shards, and an in-memory executor of reshard plans (shared by tests)."""

from __future__ import annotations

import torch

from ferry_agent.layout import TensorSpec, plan_layout
from ferry_agent.planner import chunk
from ferry_agent.transform.reshard import (
    place_from_scratch,
    plan_reshard,
    rule_for,
    segments,
    shard,
)
from ferry_agent.views import torch_dtype


def model(
    hidden: int = 256, inter: int = 384, layers: int = 2, vocab: int = 512
) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": ("bfloat16", (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": ("bfloat16", (hidden,)),
            f"{p}.self_attn.q_proj.weight": ("bfloat16", (hidden, hidden)),
            f"{p}.self_attn.k_proj.weight": ("bfloat16", (hidden // 2, hidden)),
            f"{p}.self_attn.q_proj.bias": ("float32", (hidden,)),
            f"{p}.self_attn.o_proj.weight": ("bfloat16", (hidden, hidden)),
            f"{p}.mlp.up_proj.weight": ("float16", (inter, hidden)),
            f"{p}.mlp.down_proj.weight": ("float32", (hidden, inter)),
        }
    shapes["lm_head.weight"] = ("bfloat16", (vocab, hidden))
    return shapes


def full_weights(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(shape, generator=g).to(torch_dtype(dt)) for n, (dt, shape) in shapes.items()
    }


def shard_specs(shapes: dict[str, tuple], rank: int, tp: int) -> list[TensorSpec]:
    out = []
    for n, (dt, shape) in shapes.items():
        idx = shard(shape, rule_for(n), rank, tp)
        local = tuple(len(range(*s.indices(d))) for s, d in zip(idx, shape, strict=True))
        out.append(TensorSpec(n, dt, local))
    return out


def direct_load(full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    return {n: w[shard(w.shape, rule_for(n), rank, tp)].contiguous() for n, w in full.items()}


def simulate(shapes, full, src_tp: int, dst_rank: int, dst_tp: int, chunk_bytes=1 << 12):
    """Run the plan's descriptor segments and scratch copies on byte buffers; return
    the target's tensors and the plan."""
    src_layouts = [plan_layout(shard_specs(shapes, r, src_tp), 1 << 16) for r in range(src_tp)]
    dst_layout = plan_layout(shard_specs(shapes, dst_rank, dst_tp), 1 << 16)
    src_bufs = []
    for r, lay in enumerate(src_layouts):
        bufs = [torch.zeros(n, dtype=torch.uint8) for n in lay.slab_sizes]
        local = direct_load(full, r, src_tp)
        for p in lay.placements:
            bufs[p.slab][p.offset : p.offset + p.nbytes] = (
                local[p.name].reshape(-1).view(torch.uint8)
            )
        src_bufs.append(bufs)
    plan = plan_reshard(
        [lay.placements for lay in src_layouts],
        dst_layout.placements,
        target_rank=dst_rank,
        target_tp=dst_tp,
    )
    dst_bufs = [torch.full((n,), 0xAB, dtype=torch.uint8) for n in dst_layout.slab_sizes]
    scratch = torch.full((max(plan.scratch_bytes, 1),), 0xCD, dtype=torch.uint8)
    segs = chunk(
        segments(
            plan,
            [lay.placements for lay in src_layouts],
            dst_layout.placements,
            scratch_slab=len(dst_bufs),
        ),
        chunk_bytes,
    )
    for s in segs:
        dst = scratch if s.dst_slab == len(dst_bufs) else dst_bufs[s.dst_slab]
        dst[s.dst_offset : s.dst_offset + s.nbytes] = src_bufs[s.source][s.src_slab][
            s.src_offset : s.src_offset + s.nbytes
        ]
    views = {
        p.name: dst_bufs[p.slab][p.offset : p.offset + p.nbytes]
        .view(torch_dtype(p.dtype))
        .view(p.shape)
        for p in dst_layout.placements
    }
    for pc in plan.scratch:
        place_from_scratch(pc, scratch, views[pc.name])
    return views, plan, segs

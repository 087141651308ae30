"""FP8 block transform: published layout, and the fast path against the reference quantiser."""

from __future__ import annotations

import pytest

from ferry_agent.layout import TensorSpec
from ferry_agent.transform.fp8 import (
    FP8_DTYPE,
    Fp8Rule,
    dequantize,
    fp8_specs,
    publish_into,
    quantize,
    reference_quantize,
    scale_shape,
)

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_layout_quantises_bf16_2d_weights_only_and_adds_block_scales():
    specs = [
        TensorSpec("model.embed_tokens.weight", "bfloat16", (1000, 256)),
        TensorSpec("model.layers.0.self_attn.q_proj.weight", "bfloat16", (300, 200)),
        TensorSpec("model.layers.0.input_layernorm.weight", "bfloat16", (256,)),
        TensorSpec("model.layers.0.mlp.down_proj.weight", "float32", (256, 256)),
        TensorSpec("model.layers.0.mlp.up_proj.weight", "bfloat16", (512, 256)),
    ]
    out = fp8_specs(specs)
    by = {s.name: s for s in out}
    assert [s.name for s in out] == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight_scale_inv",
    ]
    q = by["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dtype, q.shape) == (FP8_DTYPE, (300, 200))
    sc = by["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert (sc.dtype, sc.shape) == ("float32", (3, 2))  # ceil(300/128), ceil(200/128)
    assert by["model.embed_tokens.weight"] == specs[0]  # excluded by name
    assert by["model.layers.0.mlp.down_proj.weight"].dtype == "float32"  # not bf16
    assert scale_shape((128, 129)) == (1, 2)


def test_scale_name_collision_is_rejected():
    specs = [
        TensorSpec("a.weight", "bfloat16", (128, 128)),
        TensorSpec("a.weight_scale_inv", "float32", (1, 1)),
    ]
    with pytest.raises(ValueError, match="collides"):
        fp8_specs(specs, Fp8Rule())


def _weights(shape, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 4
    w[:128, :128] = 0  # an all-zero block
    w[-1, -1] = 3e4  # an outlier: its block's scale, nobody else's
    return w.to(torch.bfloat16).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (300, 200), (129, 1000), (1, 130)])
def test_fast_path_is_bit_identical_to_reference(device, shape):
    w = _weights(shape, seed=sum(shape), device=device)
    q, s = quantize(w)
    rq, rs = reference_quantize(w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantised_error_within_e4m3_rounding(device):
    w = _weights((384, 520), seed=3, device=device).float()
    q, s = quantize(w.bfloat16())
    err = (dequantize(q, s) - w).abs()
    full_s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 * scale
    bound = torch.maximum(w.abs() * 2**-4, full_s * 2**-9) * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert float(q[:128, :128].float().abs().max()) == 0.0


def test_cpu_and_gpu_agree_within_one_fp8_step():
    """Each device's fast path equals its reference bit for bit (above); across devices
    the float32 division and e4m3 rounding may differ in the last bit: allowed is one
    e4m3 step (scale within 1 float32 ulp)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    w = _weights((512, 640), seed=9, device="cpu")
    q, s = quantize(w)
    gq, gs = (t.cpu() for t in quantize(w.cuda()))
    assert torch.allclose(s, gs, rtol=2**-23, atol=0)
    codes = (q.view(torch.uint8).int() - gq.view(torch.uint8).int()).abs()
    print(f"cpu/gpu fp8 codes differing: {int((codes > 0).sum())} of {codes.numel()}")
    assert int(codes.max()) <= 1
    dq, dgq = dequantize(q, s), dequantize(gq, gs)
    assert bool(((dq - dgq).abs() <= dq.abs() * 2**-3 + s.max() * 2**-9).all())


def test_publish_into_views_quantises_and_copies_the_rest():
    specs = [
        TensorSpec("l.q_proj.weight", "bfloat16", (256, 130)),
        TensorSpec("l.norm.weight", "bfloat16", (130,)),
    ]
    out = fp8_specs(specs)
    from ferry_agent.views import torch_dtype

    views = {
        s.name: torch.full(s.shape, 7, dtype=torch.float32).to(torch_dtype(s.dtype)) for s in out
    }
    weights = {
        s.name: _weights(s.shape, 1, "cpu")
        if len(s.shape) == 2
        else torch.randn(s.shape).bfloat16()
        for s in specs
    }
    assert publish_into(weights, views) == 1
    rq, rs = reference_quantize(weights["l.q_proj.weight"])
    assert torch.equal(views["l.q_proj.weight"].view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(views["l.q_proj.weight_scale_inv"], rs)
    assert torch.equal(views["l.norm.weight"], weights["l.norm.weight"])

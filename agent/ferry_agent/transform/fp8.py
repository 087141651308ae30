"""FP8 (e4m3) with 128x128 block scales: a source publishes bf16 weights as kernel-ready FP8.

Layout side (pure): which tensors are quantised and what is published for them.
A quantised tensor `W` (bf16, 2-D, shape [M, N]) is published as
  `W`            float8_e4m3fn [M, N]
  `W_scale_inv`  float32 [ceil(M/128), ceil(N/128)]   (dequantised = fp8 * scale_inv,
                 the DeepSeek-V3 / vLLM "block fp8" checkpoint convention)
Every other tensor is published unchanged.

Numbers: per 128x128 block, scale = max(amax, AMAX_FLOOR) / 448 (448 is the
largest finite e4m3 value), q = clamp(x / scale, -448, 448) cast to e4m3 (round
to nearest even). Done in float32 from the exact bf16 values, so the blocked fast
path and the block-by-block reference give bit-identical results on CPU and GPU.

Publishing: the agent's slabs, declared with `fp8_specs(...)`, are the registered
staging memory; `quantize_into` writes straight into their views, then the source
publishes and targets pull FP8 + scales like any other weight set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..layout import TensorSpec

BLOCK = 128
FP8_MAX = 448.0
FP8_DTYPE = "float8_e4m3fn"
SCALE_DTYPE = "float32"
SCALE_SUFFIX = "_scale_inv"
# A block of zeros gets this amax: a finite, positive scale (q is then all zeros).
AMAX_FLOOR = 1e-12
# Rows of blocks quantised at once by the fast path: bounds its float32 temporaries
# to 64 * 128 rows (e.g. 256 MiB for N = 8192).
ROW_BLOCKS_PER_STEP = 64


@dataclass(frozen=True)
class Fp8Rule:
    """Which tensors are quantised: bf16, 2-D, name matches `include` and not `exclude`."""

    include: str = r"\.weight$"
    exclude: str = r"(embed|norm|lm_head|\.bias$|router|gate\.weight$)"
    dtypes: tuple[str, ...] = ("bfloat16",)

    def applies(self, spec: TensorSpec) -> bool:
        return (
            spec.dtype in self.dtypes
            and len(spec.shape) == 2
            and all(d > 0 for d in spec.shape)
            and re.search(self.include, spec.name) is not None
            and re.search(self.exclude, spec.name) is None
        )


DEFAULT_RULE = Fp8Rule()


def scale_shape(shape: Sequence[int]) -> tuple[int, int]:
    m, n = shape
    return (math.ceil(m / BLOCK), math.ceil(n / BLOCK))


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def fp8_specs(specs: Iterable[TensorSpec], rule: Fp8Rule = DEFAULT_RULE) -> list[TensorSpec]:
    """What a source publishes for `specs` (order kept; each scale right after its weight)."""
    out: list[TensorSpec] = []
    names = set()
    for s in specs:
        if rule.applies(s):
            out.append(TensorSpec(s.name, FP8_DTYPE, s.shape))
            out.append(TensorSpec(scale_name(s.name), SCALE_DTYPE, scale_shape(s.shape)))
        else:
            out.append(s)
    for s in out:
        if s.name in names:
            raise ValueError(f"fp8 layout: {s.name!r} collides with a scale tensor name")
        names.add(s.name)
    return out


# -- numbers --------------------------------------------------------------------------
def reference_quantize(w: Any) -> tuple[Any, Any]:
    """Block by block, the obvious way: the definition the fast path must match bit for bit."""
    import torch

    m, n = w.shape
    bm, bn = scale_shape(w.shape)
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((bm, bn), dtype=torch.float32, device=w.device)
    for i in range(bm):
        for j in range(bn):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            amax = blk.abs().max().clamp(min=AMAX_FLOOR)
            scale = amax / FP8_MAX
            s[i, j] = scale
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (
                (blk / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            )
    return q, s


def quantize_into(w: Any, out_q: Any, out_s: Any) -> None:
    """Blocked fast path: write FP8 of `w` into `out_q` and its scales into `out_s`.

    `out_q` / `out_s` may live on another device (e.g. the agent's staging slab
    views); the arithmetic runs on `w`'s device, ROW_BLOCKS_PER_STEP block rows at a time."""
    import torch

    m, n = w.shape
    bm, bn = scale_shape(w.shape)
    if tuple(out_q.shape) != (m, n) or out_q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"out_q must be float8_e4m3fn {[m, n]}, not {out_q.dtype} {out_q.shape}")
    if tuple(out_s.shape) != (bm, bn) or out_s.dtype != torch.float32:
        raise ValueError(f"out_s must be float32 {[bm, bn]}, not {out_s.dtype} {out_s.shape}")
    npad = bn * BLOCK
    for r0 in range(0, bm, ROW_BLOCKS_PER_STEP):
        r1 = min(bm, r0 + ROW_BLOCKS_PER_STEP)
        rows = w[r0 * BLOCK : min(m, r1 * BLOCK)].float()
        h = rows.shape[0]
        hpad = (r1 - r0) * BLOCK
        if h != hpad or n != npad:  # ragged edge: zeros change no block's amax
            rows = torch.nn.functional.pad(rows, (0, npad - n, 0, hpad - h))
        blocks = rows.view(r1 - r0, BLOCK, bn, BLOCK)
        amax = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR)
        scale = amax / FP8_MAX
        q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out_q[r0 * BLOCK : r0 * BLOCK + h].copy_(q.view(hpad, npad)[:h, :n])
        out_s[r0:r1].copy_(scale)


def quantize(w: Any) -> tuple[Any, Any]:
    import torch

    q = torch.empty(tuple(w.shape), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(scale_shape(w.shape), dtype=torch.float32, device=w.device)
    quantize_into(w, q, s)
    return q, s


def dequantize(q: Any, s: Any) -> Any:
    """float32 [M, N] from FP8 and block scales (for checks and for engines without FP8 GEMMs)."""
    m, n = q.shape
    full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    return q.float() * full


def publish_into(
    weights: Mapping[str, Any], views: Mapping[str, Any], rule: Fp8Rule = DEFAULT_RULE
) -> int:
    """Fill the views of an `fp8_specs` layout from bf16 `weights`; returns tensors quantised.

    Call between the engine client's begin_write() and publish() (`with c.writing(v):`)."""
    from ..views import torch_dtype

    quantised = 0
    for name, w in weights.items():
        spec = TensorSpec(name, str(w.dtype).removeprefix("torch."), tuple(w.shape))
        if rule.applies(spec):
            quantize_into(w, views[name], views[scale_name(name)])
            quantised += 1
        else:
            dst = views[name]
            if dst.dtype != torch_dtype(spec.dtype) or tuple(dst.shape) != spec.shape:
                raise ValueError(f"{name}: view is {dst.dtype} {tuple(dst.shape)}, weight {spec}")
            dst.copy_(w)
    return quantised

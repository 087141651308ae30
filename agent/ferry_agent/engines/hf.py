"""HF transformers on Ferry's slabs: models built from a config, and what they serve.

Nothing here is needed to bind an HF model (`BoundModule` takes any module: HF
ties embeddings by sharing the Parameter object, which binding keeps, and its
rotary `inv_freq` buffers are non-persistent, so the model recomputes them).
These helpers make the models and outputs that trainers, replicas, tests and
benchmarks compare:

- `model_from_config`: a real `AutoModelForCausalLM` from a config with random
  weights (nothing downloaded), in the served dtype and device;
- `served_copy`: the model a replica serves for a trainer's weights (built the
  same way, the trainer's weights copied in with the publish's cast);
- `greedy`: greedy tokens from a prompt and the logits of the whole sequence, with
  a digest of their bytes (bit-identical means equal digests).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# CPU matmuls may split their work differently with another thread count; outputs
# compared across processes are computed with this many threads.
GREEDY_THREADS = 1


def config_from_dict(config: Mapping[str, Any]) -> Any:
    """A transformers config from a plain dict with `model_type` (e.g. "llama", "qwen2")."""
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def model_from_config(
    config: Mapping[str, Any] | Any, *, dtype: Any = None, device: Any = "cpu", seed: int = 0
) -> Any:
    """A causal LM with random weights (seeded), in eval mode, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict(config) if isinstance(config, Mapping) else config
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    return model.eval()


def served_copy(
    trainer: Any, config: Mapping[str, Any] | Any, *, dtype: Any, device: Any = None
) -> Any:
    """What a replica serves for `trainer`'s current weights: a model built like the
    replica's (so non-persistent buffers are made alike), loaded with the trainer's
    state dict cast to `dtype` (copy_ rounds like the publisher's copy into the slabs)."""
    import torch

    dev = device or next(trainer.parameters()).device
    model = model_from_config(config, dtype=dtype, device=dev)
    with torch.no_grad():
        model.load_state_dict(trainer.state_dict())
    return model


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]  # the generated tokens (prompt excluded)
    logits_sha256: str  # over the bytes of the logits of prompt + generated tokens
    logits_head: list[float]  # the first few logits, for a human reading a failure


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy(model: Any, prompt: Sequence[int], new_tokens: int) -> Greedy:
    """Greedy generation (no sampling) and the logits of the whole sequence."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    with torch.no_grad(), _threads(GREEDY_THREADS):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        logits = model(out).logits.float().cpu()
    tokens = out[0, len(prompt) :].tolist()
    digest = hashlib.sha256(logits.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return Greedy(tokens, digest, [round(float(x), 6) for x in logits.view(-1)[:4]])


__all__ = ["Greedy", "config_from_dict", "greedy", "model_from_config", "served_copy"]

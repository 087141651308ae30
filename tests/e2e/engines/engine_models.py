"""A tiny torch model with what a real one has: a tied embedding, a norm, persistent and
non-persistent buffers (shared by the torch-layer tests and the FSDP worker)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """Embedding tied to the output head, a norm, a projection, a persistent buffer
    (shipped) and a non-persistent one (recomputed, never shipped)."""

    def __init__(self, vocab: int = 96, dim: int = 32, tied: bool = True, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, dtype=dtype)
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.proj = nn.Linear(dim, dim, dtype=dtype)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=dtype)
        self.register_buffer("scale", torch.ones(dim, dtype=dtype))
        self.register_buffer("positions", torch.arange(8, dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale
        return self.head(self.proj(self.norm(h)))


IDS = torch.tensor([[1, 5, 9, 2, 7]])


def trained(seed: int, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw)


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(IDS).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

"""Small hand-written attention modules, one per way of writing attention (SDPA with
``is_causal``, with a caller's mask, with grouped-query heads, written out in eager ops,
``nn.MultiheadAttention``), shared by the tests of prefixes and of deleting them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Bare(nn.Module):
    """``sdpa(q, k, v)`` and nothing else, so the output is the attention itself."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class BareGQA(nn.Module):
    """Grouped-query attention in the op itself: fewer key/value heads, ``enable_gqa``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class _Heads(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def split(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        b, n, _ = x.shape
        return layer(x).view(b, n, self.heads, -1).transpose(1, 2)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class CausalSDPA(_Heads):
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(x, m) for m in (self.q, self.k, self.v))
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MaskedSDPA(_Heads):
    """SDPA with a mask given by the caller (boolean or additive)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(x, m) for m in (self.q, self.k, self.v))
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class EagerAttention(_Heads):
    """``softmax(q @ k^T / sqrt(d) + mask) @ v`` written out, with an additive mask."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(x, m) for m in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores + mask, dim=-1)
        return self.merge(torch.matmul(probs, v))


class MHAModel(nn.Module):
    """A batch-first (or sequence-first) ``nn.MultiheadAttention`` with a padding mask."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, key_padding_mask=pad)
        return self.out(a)


def padding(batch: int = 2, seq: int = 6, pad: int = 2) -> torch.Tensor:
    """``True`` on the last ``pad`` positions of sample 0 (``nn.MultiheadAttention`` style)."""
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[0, seq - pad:] = True
    return mask


def hand_models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """``{name: (model in eval mode, inputs)}`` for ``"causal"``, ``"eager"``,
    ``"masked_bool"`` and ``"mha"``; seeded, so every call gives the same weights."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    pad = padding()
    additive = torch.zeros(2, 1, 1, 6).masked_fill(pad[:, None, None, :], float("-inf"))
    return {
        "causal": (CausalSDPA().eval(), (x,)),
        "eager": (EagerAttention().eval(), (x, additive)),
        "masked_bool": (MaskedSDPA().eval(), (x, ~pad[:, None, None, :])),
        "mha": (MHAModel().eval(), (torch.randn(2, 6, 8), pad)),
    }

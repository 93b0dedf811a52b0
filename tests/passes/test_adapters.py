"""Tests of passes/adapters.py, passes/sublayers.py and passes/bottleneck.py: serial
(Houlsby / Pfeiffer) and parallel (He et al.) bottleneck adapters.

The invariants on the zoo (TinyTransformer by torch.fx; GPT-2, LLaMA, BERT by torch.export),
the math on small hand-written pre-LN and post-LN blocks, the residual counted once on LLaMA
and BERT, passing the sub-layer input across module boundaries, stacking with LoRA / IA³,
the ``active`` switch, errors, the audit and the diff report.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import Shared
from passes.adapters import ParallelAdapterPass, SerialAdapterPass
from passes.bottleneck import BottleneckAdapter, BottleneckProjection
from passes.sublayers import find_sublayers
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    UnsupportedSiteError,
    apply_passes,
    audit,
    named_trainable_parameters,
    plan,
    trace,
)
from surgery.map.graphs import graph_modules

PROJ = ("down", "up")


# ---- helpers --------------------------------------------------------------------------------


def _set_random(model: nn.Module, seed: int, *, which: tuple[str, ...] = ("up",)) -> None:
    """Give the chosen projections of every bottleneck adapter seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BottleneckAdapter):
                for part in which:
                    proj = getattr(mod, part)
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.3)
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.3)


@contextmanager
def _capture(model: nn.Module, *names: str) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Record ``(first input, output)`` of the named submodules while the block runs."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out))) for n in names]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _adapter_param_names(sites: list[str], slot: str, name: str = "default") -> set[str]:
    return {f"{s}.{slot}.{name}.{p}.{t}" for s in sites for p in PROJ for t in ("weight", "bias")}


# ---- the invariant table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Layer names of one zoo model: per block, the attention output projection, the
    feed-forward down projection, and the layers whose inputs the parallel adapters read."""

    attn_out: str
    ffn_down: str
    ffn_in: str
    attn_in: str

    def names(self, field: str) -> list[str]:
        return [getattr(self, field).format(i=i) for i in range(2)]


ROWS = {
    "builtin:tiny": Row("layers.{i}.attn.o_proj", "layers.{i}.mlp.down_proj",
                        "layers.{i}.mlp.up_proj", "layers.{i}.attn.q_proj"),
    "hf:gpt2": Row("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj",
                   "transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.attn.c_attn"),
    "hf:llama": Row("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj",
                    "model.layers.{i}.mlp.up_proj", "model.layers.{i}.self_attn.q_proj"),
    "hf:bert": Row("encoder.layer.{i}.attention.output.dense",
                   "encoder.layer.{i}.output.dense",
                   "encoder.layer.{i}.intermediate.dense",
                   "encoder.layer.{i}.attention.self.query"),
}
KINDS = ["serial", "parallel", "parallel_attn"]


def _cell(row: Row, kind: str) -> tuple[Any, list[str], str, list[str]]:
    """(pass, sites, slot, layers whose input the adapter reads; [] = the site's output)."""
    if kind == "serial":
        return (SerialAdapterPass(bottleneck=8),
                sorted(row.names("attn_out") + row.names("ffn_down")), "adapter", [])
    if kind == "parallel":
        return ParallelAdapterPass(reduction_factor=8), row.names("ffn_down"), "parallel_adapter", \
            row.names("ffn_in")
    return (ParallelAdapterPass(role="attention", bottleneck=8), row.names("attn_out"),
            "parallel_adapter", row.names("attn_in"))


@pytest.mark.parametrize("model", list(ROWS))
@pytest.mark.parametrize("kind", KINDS)
def test_invariants(zoo, snapshot, run_model, model: str, kind: str) -> None:
    row, spec, caller = ROWS[model], zoo.spec(model), zoo.traced(model)
    adapter_pass, sites, slot, inputs = _cell(row, kind)
    before = snapshot(caller)
    adapted = apply_passes(caller, [adapter_pass])
    adapted.eval()

    # identity at init, bitwise
    expected = run_model(spec.model, spec)
    with torch.no_grad():
        got = run_model(adapted, spec)
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item():.3g}"

    # exactly the adapter parameters train
    assert {n for n, _ in named_trainable_parameters(adapted)} == _adapter_param_names(sites, slot)
    frozen = sorted(n for n, p in adapted.named_parameters() if not p.requires_grad)
    assert frozen == sorted(n for n, _ in caller.named_parameters())

    # the adapter reads what it should: the anchor's output (serial) or the sub-layer input
    adapter0 = f"{sites[0]}.{slot}.default"
    watched = [sites[0], f"{adapter0}.down"] + inputs[:1]
    with torch.no_grad(), _capture(adapted, *watched) as seen:
        run_model(adapted, spec)
    read = seen[f"{adapter0}.down"][0]
    assert torch.equal(read, seen[inputs[0]][0] if inputs else seen[sites[0]][1])

    # gradients: up gets them at init (down's are exactly zero while up is zero) ...
    adapted.train()
    run_model(adapted, spec).float().pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        if ".up." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name
    # ... and every adapter parameter gets them once up is non-zero
    adapted.zero_grad(set_to_none=True)
    _set_random(adapted, 0)
    run_model(adapted, spec).float().pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)

    before.assert_unchanged(caller)


@pytest.mark.parametrize("model", ["builtin:tiny", "hf:bert"])
def test_plain_caller_unchanged_and_storage_shared(zoo, snapshot, run_model, model: str) -> None:
    spec = zoo.fresh(model)
    before = snapshot(spec.model)
    passes = [SerialAdapterPass(bottleneck=4), ParallelAdapterPass(bottleneck=4)]
    adapted = apply_passes(spec.model, passes, spec.example_inputs, spec.example_kwargs or None)
    _set_random(adapted, 1)
    adapted.train()
    run_model(adapted, spec).pow(2).mean().backward()
    before.assert_unchanged(spec.model)
    theirs = dict(adapted.named_parameters())
    for name, param in spec.model.named_parameters():
        assert theirs[name] is not param and theirs[name].data_ptr() == param.data_ptr(), name


def test_state_dict_keys_read_naturally(zoo) -> None:
    adapted = apply_passes(zoo.traced("builtin:tiny"), [SerialAdapterPass(bottleneck=8)])
    keys = adapted.state_dict()
    assert keys["layers.0.attn.o_proj.adapter.default.down.weight"].shape == (8, 64)
    assert keys["layers.0.attn.o_proj.adapter.default.down.bias"].shape == (8,)
    assert keys["layers.0.attn.o_proj.adapter.default.up.weight"].shape == (64, 8)
    assert not keys["layers.0.attn.o_proj.adapter.default.up.weight"].any()
    assert not keys["layers.0.attn.o_proj.adapter.default.up.bias"].any()


# ---- serial adapters in pre-LN and post-LN blocks ----------------------------------------------


class PostLNBlock(nn.Module):
    """BERT-style feed-forward sub-layer: ``norm(x + dropout(dense(gelu(fc(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.dense = nn.Linear(16, 8)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(8)

    def sublayer(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(F.gelu(self.fc(x)))

    def pre_norm(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h  # dropout is the identity in evaluation mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense(F.gelu(self.fc(x)))))


class PreLNBlock(nn.Module):
    """LLaMA / GPT-2 style: ``final(x + dense(gelu(fc(norm(x)))))``; ``final`` stands for the
    next block's norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.dense = nn.Linear(16, 8)
        self.final = nn.LayerNorm(8)

    def sublayer(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(F.gelu(self.fc(self.norm(x))))

    def pre_norm(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(x + self.dense(F.gelu(self.fc(self.norm(x)))))


@pytest.mark.parametrize("block_cls,norm", [(PostLNBlock, "norm"), (PreLNBlock, "final")])
def test_serial_adapter_in_a_block_adds_its_residual_once(block_cls: type, norm: str) -> None:
    torch.manual_seed(0)
    block = block_cls().eval()
    x = torch.randn(3, 5, 8)
    adapted = apply_passes(block, [SerialAdapterPass(placement="pfeiffer", bottleneck=3)]).eval()
    adapter = adapted.get_submodule("dense.adapter.default")
    assert adapter.site == "dense" and adapter.role == "ffn_down"
    assert torch.equal(adapted(x), block(x)), "identity at init"

    _set_random(adapted, 2)
    with torch.no_grad(), _capture(adapted, norm) as seen:
        out = adapted(x)
        h = block.sublayer(x)                                    # the anchor's output
        u = F.linear(F.gelu(F.linear(h, adapter.down.weight, adapter.down.bias)),
                     adapter.up.weight, adapter.up.bias)         # the adapter's branch
        want_pre = block.pre_norm(x, h + u)                      # model residual + (h + f(h))
        assert torch.equal(seen[norm][0], want_pre)
        assert torch.equal(out, block.get_submodule(norm)(want_pre))
        # perturbing up moved the pre-norm sum by exactly the adapter's contribution
        delta = seen[norm][0] - block.pre_norm(x, h)
        assert u.abs().min() > 0 and (delta - u).abs().max() <= 1e-6  # float32 re-association


@pytest.mark.parametrize("model,anchor,residual,norm,residual_first", [
    ("hf:llama", "model.layers.0.self_attn.o_proj", "model.layers.0.input_layernorm",
     "model.layers.0.post_attention_layernorm", True),
    ("hf:bert", "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.query",
     "encoder.layer.0.attention.output.LayerNorm", False),
])
def test_serial_adapter_residual_counted_once_on_real_blocks(
        zoo, run_model, model: str, anchor: str, residual: str, norm: str,
        residual_first: bool) -> None:
    """LLaMA (pre-LN): ``residual + (h + f(h))`` reaches the next norm; BERT (post-LN):
    ``(h + f(h)) + residual`` reaches the LayerNorm. The residual is the sub-layer's input,
    seen as the input of the block's first norm (LLaMA) or of the query projection (BERT)."""
    adapted = apply_passes(zoo.traced(model), [SerialAdapterPass(pattern=anchor, bottleneck=4)])
    adapted.eval()
    _set_random(adapted, 3)
    up = f"{anchor}.adapter.default.up"
    with torch.no_grad(), _capture(adapted, residual, anchor, up, norm) as seen:
        run_model(adapted, zoo.spec(model))
    res, h, u, pre = seen[residual][0], seen[anchor][1], seen[up][1], seen[norm][0]
    assert u.abs().sum() > 0
    assert torch.equal(pre, res + (h + u) if residual_first else (h + u) + res)


# ---- parallel adapters: the math -------------------------------------------------------------


def test_parallel_adapter_on_the_feed_forward_block() -> None:
    torch.manual_seed(0)
    block = PreLNBlock().eval()
    x = torch.randn(3, 5, 8)
    adapted = apply_passes(block, [ParallelAdapterPass(bottleneck=3, scaling=2.5)]).eval()
    assert torch.equal(adapted(x), block(x))
    adapter = adapted.get_submodule("dense.parallel_adapter.default")
    assert (adapter.in_features, adapter.bottleneck, adapter.out_features) == (8, 3, 8)
    _set_random(adapted, 4, which=("down", "up"))
    with torch.no_grad():
        n = block.norm(x)                                           # the sub-layer's input
        branch = F.linear(torch.relu(F.linear(n, adapter.down.weight, adapter.down.bias)),
                          adapter.up.weight, adapter.up.bias)
        want = block.final(x + (block.dense(F.gelu(block.fc(n))) + 2.5 * branch))
        assert torch.equal(adapted(x), want)
        assert torch.equal(adapter(n), 2.5 * branch), "forward() is the scaled branch"


def test_parallel_adapter_on_a_single_layer_spans_its_input_and_output() -> None:
    torch.manual_seed(0)
    block = PreLNBlock().eval()
    x = torch.randn(3, 5, 8)
    single = ParallelAdapterPass(pattern="fc", bottleneck=2, activation="tanh", scaling=0.5)
    adapted = apply_passes(block, [single]).eval()
    adapter = adapted.get_submodule("fc.parallel_adapter.default")
    assert (adapter.in_features, adapter.out_features) == (8, 16), "8 -> 2 -> fc's 16"
    _set_random(adapted, 5, which=("down", "up"))
    with torch.no_grad():
        n = block.norm(x)
        g = block.fc(n) + 0.5 * adapter.up(torch.tanh(adapter.down(n)))
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


def test_parallel_adapter_passes_the_input_across_export_modules(snapshot) -> None:
    torch.manual_seed(0)
    model = SplitFFN().eval()
    x = torch.randn(2, 5, 8)
    traced = trace(model, (x,), frontend="export")
    before = snapshot(traced)
    adapted = apply_passes(traced, [ParallelAdapterPass(bottleneck=3)])
    before.assert_unchanged(traced)
    carried = [n for _, m in graph_modules(adapted) for n in m.graph.nodes
               if n.op == "placeholder" and (n.meta.get("surgery") or {}).get("part") == "carry"]
    assert [str(n.target) for n in carried] == ["carry_x"], "x is passed into down's graph"
    change = [c for c in adapted._surgery.history[0].changes if c.name.endswith("/carry")]
    assert [c.name for c in change] == ["down/carry"]
    assert torch.equal(adapted(x), model(x))
    _set_random(adapted, 6)
    adapter = adapted.get_submodule("down.lin.parallel_adapter.default")
    with torch.no_grad():
        want = x + (model.down(model.up(x)) + 4.0 * adapter.up(torch.relu(adapter.down(x))))
        assert torch.equal(adapted(x), want)
        assert torch.equal(adapted(x[:1]), want[:1]), "still accepts another batch size"

    # atomic: a later pass that fails leaves the traced model (graphs included) as it was
    with pytest.raises(NoMatchError, match="'no_such_layer'"):
        apply_passes(traced, [ParallelAdapterPass(bottleneck=3),
                              SerialAdapterPass(pattern="no_such_layer")], inplace=True)
    before.assert_unchanged(traced)


def test_parallel_adapter_input_computed_inside_another_module_is_refused() -> None:
    x = torch.randn(2, 5, 8)
    traced = trace(SplitFFN(norm=True).eval(), (x,), frontend="export")
    with pytest.raises(UnsupportedSiteError, match=r"the input of up\.lin is computed inside 'up'"):
        apply_passes(traced, [ParallelAdapterPass(bottleneck=3)])
    assert apply_passes(traced, [ParallelAdapterPass(pattern="lin", bottleneck=3)]) is not None


def test_find_sublayers_pairs_gate_and_up_with_their_down(zoo) -> None:
    subs = find_sublayers(zoo.traced("hf:llama"), "ffn")
    assert [(s.output.qname, s.inputs) for s in subs] == [
        (f"model.layers.{i}.mlp.down_proj",
         (f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.gate_proj")) for i in range(2)]
    attn = find_sublayers(zoo.traced("hf:gpt2"), "attention")
    assert [(s.output.qname, s.inputs) for s in attn] == [
        (f"transformer.h.{i}.attn.c_proj", (f"transformer.h.{i}.attn.c_attn",)) for i in range(2)]


# ---- selection -------------------------------------------------------------------------------


def test_houlsby_and_pfeiffer_placements_on_llama(zoo) -> None:
    traced = zoo.traced("hf:llama")
    houlsby = SerialAdapterPass(reduction_factor=16).sites(traced)
    pfeiffer = SerialAdapterPass(placement="pfeiffer").sites(traced)
    assert [s.qname for s in houlsby] == [f"model.layers.{i}.{p}" for i in range(2)
                                          for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert [s.qname for s in pfeiffer] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    changes = plan(traced, [SerialAdapterPass(placement="pfeiffer")])[0].changes
    assert {c.site for c in changes} == {s.qname for s in pfeiffer}
    shapes = {c.shape for c in changes if c.kind == "param_added" and c.name.endswith("down.weight")}
    assert shapes == {(4, 64)}, "reduction_factor 16 (the default) on width 64"


def test_pattern_and_role_replace_the_placement(zoo) -> None:
    traced = zoo.traced("builtin:tiny")
    assert [s.qname for s in SerialAdapterPass(role="attn_out").sites(traced)] == \
        [f"layers.{i}.attn.o_proj" for i in range(2)]
    by_pattern = SerialAdapterPass(pattern="layers.1.mlp.*", placement="pfeiffer").sites(traced)
    assert [s.qname for s in by_pattern] == ["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    subs = ParallelAdapterPass(role="ffn", pattern="layers.0.**").sublayers(traced)
    assert [s.output.qname for s in subs] == ["layers.0.mlp.down_proj"]
    subs = ParallelAdapterPass(role=["attn", "ffn"], exclude="layers.0.**").sublayers(traced)
    assert [s.output.qname for s in subs] == ["layers.1.attn.o_proj", "layers.1.mlp.down_proj"]


# ---- stacking and switching --------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.down = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("order", ["lora_first", "adapter_first"])
def test_serial_adapter_wraps_the_layer_as_adapted_by_lora(order: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    lora = LoRAPass(pattern="down", rank=2, alpha=4)
    serial = SerialAdapterPass(pattern="down", bottleneck=3)
    adapted = apply_passes(model, [lora, serial] if order == "lora_first" else [serial, lora])
    _set_random(adapted, 7)
    with torch.no_grad():
        adapted.get_submodule("down.lora_B.default").weight.normal_()
    lora_a = adapted.get_submodule("down.lora_A.default")
    lora_b = adapted.get_submodule("down.lora_B.default")
    adapter = adapted.get_submodule("down.adapter.default")
    x = torch.randn(4, 6)
    with torch.no_grad():
        g = torch.relu(model.up(x))
        h = model.down(g) + lora_b(lora_a(g)) * 2.0  # LoRA's scaling: alpha / rank = 4 / 2
        want = x + (h + adapter.up(F.gelu(adapter.down(h))))
        assert torch.equal(adapted(x), want)


def test_serial_adapter_on_a_shared_layer_follows_every_call() -> None:
    torch.manual_seed(0)
    model = Shared()
    adapted = apply_passes(model, [SerialAdapterPass(pattern="proj", bottleneck=2)])
    _set_random(adapted, 10)
    adapter = adapted.get_submodule("proj.adapter.default")
    x = torch.randn(4, 8)
    with torch.no_grad():
        def f(h: torch.Tensor) -> torch.Tensor:
            return h + adapter.up(F.gelu(adapter.down(h)))

        assert torch.equal(adapted(x), model.head(f(model.proj(torch.relu(f(model.proj(x)))))))


def test_ia3_after_a_serial_adapter_scales_the_adapted_output() -> None:
    torch.manual_seed(0)
    model = MLP()
    adapted = apply_passes(model, [SerialAdapterPass(pattern="up", bottleneck=3),
                                   IA3Pass(pattern="up")])
    _set_random(adapted, 8)
    vec = adapted.get_submodule("up.ia3_l.default")
    assert vec.mode == "output"
    with torch.no_grad():
        vec.weight.uniform_(0.5, 1.5)
    adapter = adapted.get_submodule("up.adapter.default")
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = model.up(x)
        scaled = (h + adapter.up(F.gelu(adapter.down(h)))) * vec.weight
        assert torch.equal(adapted(x), x + model.down(torch.relu(scaled)))


def test_inactive_adapters_contribute_nothing(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(zoo.traced("builtin:tiny"),
                           [SerialAdapterPass(bottleneck=4),
                            ParallelAdapterPass(bottleneck=4, name="par")])
    _set_random(adapted, 9)
    base = run_model(spec.model, spec)
    with torch.no_grad():
        trained = run_model(adapted, spec)
        assert not torch.equal(trained, base)
        adapters = [m for m in adapted.modules() if isinstance(m, BottleneckAdapter)]
        assert len(adapters) == 6
        for m in adapters:
            m.active = False
        assert all(not m.down.active and not m.up.active for m in adapters)
        assert torch.equal(run_model(adapted, spec), base)
        up = adapters[0].up
        zeros = torch.zeros(2, 3, up.out_features)
        assert torch.equal(up(torch.randn(2, 3, up.in_features)), zeros)
        for m in adapters:
            m.active = True
        assert torch.equal(run_model(adapted, spec), trained)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SerialAdapterPass, ParallelAdapterPass])
def test_configuration_errors(cls: type) -> None:
    who = cls.__name__
    with pytest.raises(ConfigError, match=rf"{who}: give bottleneck= or reduction_factor=, not"):
        cls(bottleneck=8, reduction_factor=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"{who}: bottleneck must be a positive int, got "
                                              rf"{bad!r}"):
            cls(bottleneck=bad)
        with pytest.raises(ConfigError, match=rf"{who}: reduction_factor must be a positive int"):
            cls(reduction_factor=bad)
    with pytest.raises(ConfigError, match=r"unknown activation 'reluu'; nearest: relu"):
        cls(activation="reluu")
    with pytest.raises(ConfigError, match="name must be a Python identifier"):
        cls(name="a b")


def test_pass_specific_configuration_errors(zoo) -> None:
    with pytest.raises(ConfigError, match=r"unknown placement 'houlsbey'; nearest: houlsby"):
        SerialAdapterPass(placement="houlsbey")
    with pytest.raises(ConfigError, match=r"role must name a sub-layer, 'ffn' or 'attention', "
                                          r"got 'ffn_down'"):
        ParallelAdapterPass(role="ffn_down")
    with pytest.raises(ConfigError, match="scaling must be a finite number"):
        ParallelAdapterPass(scaling=float("nan"))
    with pytest.raises(ConfigError, match=r"reduction_factor=128 leaves no bottleneck at "
                                          r"layers\.0\.attn\.o_proj"):
        apply_passes(zoo.traced("builtin:tiny"), [SerialAdapterPass(reduction_factor=128)])


def test_selection_errors(zoo) -> None:
    traced = zoo.traced("builtin:tiny")
    with pytest.raises(NoMatchError, match=r"SerialAdapterPass: pattern 'o_prj' matches no module"):
        apply_passes(traced, [SerialAdapterPass(pattern="o_prj")])
    with pytest.raises(NoMatchError, match=r"ParallelAdapterPass: pattern 'o_prj' matches no "):
        apply_passes(traced, [ParallelAdapterPass(pattern="o_prj")])
    with pytest.raises(NoMatchError,
                       match=r"pattern 'layers\.7\.\*\*' matches no layer of the ffn sub-layers"):
        apply_passes(traced, [ParallelAdapterPass(role="ffn", pattern="layers.7.**")])
    with pytest.raises(NoMatchError, match="no feed-forward block was found"):
        apply_passes(nn.Sequential(nn.Linear(4, 4)), [ParallelAdapterPass()])
    once = apply_passes(traced, [SerialAdapterPass(bottleneck=4)])
    with pytest.raises(AlreadyAdaptedError, match=r"layers\.0\.attn\.o_proj \(Linear\) already "
                                                  r"has an adapter named 'default' in slot "
                                                  r"'adapter'"):
        apply_passes(once, [SerialAdapterPass(bottleneck=4)])
    twice = apply_passes(once, [SerialAdapterPass(bottleneck=4, name="other"),
                                ParallelAdapterPass(bottleneck=4)])
    names = {(m.pass_name, m.adapter_name) for m in twice.modules() if isinstance(m, BottleneckAdapter)}
    assert names == {("serial_adapter", "default"), ("serial_adapter", "other"),
                     ("parallel_adapter", "default")}


def test_multihead_attention_has_no_projection_calls(zoo) -> None:
    traced = zoo.traced("builtin:encoder")
    with pytest.raises(UnsupportedSiteError, match=r"placement='houlsby' .* nn\.MultiheadAttention"):
        apply_passes(traced, [SerialAdapterPass()])
    with pytest.raises(UnsupportedSiteError, match=r"nn\.MultiheadAttention \(layers\.0\.self_attn"):
        apply_passes(traced, [ParallelAdapterPass(role="attention")])
    adapted = apply_passes(traced, [SerialAdapterPass(placement="pfeiffer"), ParallelAdapterPass()])
    assert sorted({m.site for m in adapted.modules() if isinstance(m, BottleneckAdapter)}) == \
        ["layers.0.linear2", "layers.1.linear2"]


# ---- audit and diff ----------------------------------------------------------------------------


def test_audit_and_diff_list_the_adapters(zoo, tmp_path) -> None:
    from visualize import MissingRendererWarning, render_diff

    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(zoo.traced("builtin:tiny"),
                           [SerialAdapterPass(bottleneck=8), ParallelAdapterPass(bottleneck=4)])
    report = audit(adapted)
    summary = {a.key: a for a in report.adapters}
    serial_sites = [f"layers.{i}.{p}" for i in range(2) for p in ("attn.o_proj", "mlp.down_proj")]
    assert summary["serial_adapter:default"].sites == tuple(serial_sites)
    assert summary["serial_adapter:default"].params == 4 * ((64 * 8 + 8) + (8 * 64 + 64))
    assert summary["parallel_adapter:default"].params == 2 * ((64 * 4 + 4) + (4 * 64 + 64))
    assert summary["parallel_adapter:default"].trainable == "yes"
    rows = {r.name: r for r in report.rows}
    up = rows["layers.0.attn.o_proj.adapter.default.up"]
    assert (up.type, up.params, up.trainable, up.added_by) == \
        ("BottleneckProjection", 8 * 64 + 64, "yes", ("serial_adapter:default",))
    assert rows["layers.0.attn.o_proj"].adapters == ("serial_adapter:default",)
    assert "serial_adapter:default: 4 site(s), 4,384 params" in str(report)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        diff = render_diff(spec.model, adapted, tmp_path)
    added = {r.name: (r.shape, r.trainable, r.pass_name) for r in diff.added}
    assert set(added) == _adapter_param_names(serial_sites, "adapter") | _adapter_param_names(
        [f"layers.{i}.mlp.down_proj" for i in range(2)], "parallel_adapter")
    assert added["layers.0.mlp.down_proj.parallel_adapter.default.down.weight"] == \
        ((4, 64), True, "parallel_adapter")
    parts = {n.label.rsplit(".", 1)[-1] for n in diff.nodes if n.pass_name == "serial_adapter"}
    assert {"down", "act", "up"} <= parts

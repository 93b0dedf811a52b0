"""Tests of surgery/active.py: switching named adapters on and off, and which of them train.

A stack of named adapters of every kind sits on one base (LoRA ``a`` and ``b``, IA³ ``c``,
a serial adapter ``s``, a parallel adapter ``p``, a gated prefix ``g``), applied in two
``apply_passes`` calls. Each adapter alone is also applied to the same base with the stack's
parameter values copied in; switching the stack to that adapter must give its outputs bit
for bit (``torch.equal``), on torch.fx (built-in model) and torch.export (LLaMA).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.adapters import ParallelAdapterPass, SerialAdapterPass
from passes.merge import MergeLoRAPass, merged_adapters
from passes.prefix import PrefixPass
from surgery import (
    AdapterModule,
    AdapterNotFoundError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    Pass,
    apply_passes,
    trainable_parameters,
)
from surgery.adapters.active import (
    INACTIVE_KEY,
    active_adapters,
    adapter_names,
    disable_adapters,
    set_active,
    set_trainable,
)
from surgery.map.graphs import graph_modules

FIRST: dict[str, Pass] = {
    "a": LoRAPass(role=["query", "key", "value", "attn_out"], rank=4, name="a"),
    "b": LoRAPass(role=["query", "value"], rank=2, name="b"),
    "c": IA3Pass(name="c"),  # keys, values (output scaling), ffn down (input scaling)
}
SECOND: dict[str, Pass] = {
    "s": SerialAdapterPass(bottleneck=8, name="s"),
    "p": ParallelAdapterPass(bottleneck=8, name="p"),
    "g": PrefixPass(length=3, gate="zero", name="g"),
}
NAMES = [*FIRST, *SECOND]
KINDS = {"a": ("lora",), "b": ("lora",), "c": ("ia3",), "s": ("serial_adapter",),
         "p": ("parallel_adapter",), "g": ("prefix",)}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Every adapter parameter ~ 1 + N(0, 0.1²) for IA³ vectors, N(0, 0.1²) otherwise, so
    every adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * 0.1
                param.copy_(noise + 1 if ".ia3_l." in name else noise)


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    return {f"{q}.{n}": p for q, m in model.named_modules()
            if isinstance(m, AdapterModule) and m.adapter_name == name
            for n, p in m.named_parameters(recurse=False)}


class Case:
    """A zoo model with the stack applied, each adapter alone, and inputs."""

    def __init__(self, zoo, name: str) -> None:
        spec = zoo.spec(name)
        traced = zoo.traced(name)
        self.base = traced
        self.args, self.kwargs = spec.example_inputs, spec.example_kwargs
        stacked = apply_passes(traced, list(FIRST.values()))
        self.stacked = apply_passes(stacked, list(SECOND.values()))  # a second call
        randomize(self.stacked)
        self.alone = {}
        for key, p in {**FIRST, **SECOND}.items():
            only = apply_passes(traced, [p])
            source = adapter_params(self.stacked, key)
            with torch.no_grad():
                for pname, param in adapter_params(only, key).items():
                    param.copy_(source[pname])
            self.alone[key] = only

    def run(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model(*self.args, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=["builtin", "hf:llama"])
def case(request, zoo) -> Case:
    return Case(zoo, request.param)


@pytest.fixture(autouse=True)
def all_active(request) -> None:
    yield
    if "case" in request.fixturenames:
        model = request.getfixturevalue("case").stacked
        set_active(model, None)
        set_trainable(model, None)


def test_names_and_kinds(case: Case) -> None:
    assert adapter_names(case.stacked) == KINDS  # in module order
    assert list(adapter_names(case.stacked)) == active_adapters(case.stacked)
    assert sorted(active_adapters(case.stacked)) == sorted(NAMES)
    assert case.stacked._surgery.active is None


def test_each_adapter_alone_equals_the_model_adapted_with_it_only(case: Case) -> None:
    full = case.run(case.stacked)
    base = case.run(case.base)
    for key in NAMES:
        assert set_active(case.stacked, key) is case.stacked
        assert active_adapters(case.stacked) == [key]
        assert case.stacked._surgery.active == {key}
        got = case.run(case.stacked)
        assert torch.equal(got, case.run(case.alone[key])), key
        assert not torch.equal(got, base) and not torch.equal(got, full), key
    set_active(case.stacked, ["b", "a"])
    assert active_adapters(case.stacked) == ["a", "b"]
    set_active(case.stacked, None)
    assert torch.equal(case.run(case.stacked), full)


def test_disable_adapters_gives_the_base_and_restores(case: Case) -> None:
    set_active(case.stacked, ["a", "s"])
    with disable_adapters(case.stacked) as model:
        assert model is case.stacked and active_adapters(model) == []
        assert torch.equal(case.run(model), case.run(case.base))
    assert active_adapters(case.stacked) == ["a", "s"]
    assert case.stacked._surgery.active == {"a", "s"}
    with pytest.raises(RuntimeError, match="boom"), disable_adapters(case.stacked):
        raise RuntimeError("boom")
    assert active_adapters(case.stacked) == ["a", "s"]


def test_empty_list_switches_everything_off(case: Case) -> None:
    set_active(case.stacked, [])
    assert active_adapters(case.stacked) == []
    assert torch.equal(case.run(case.stacked), case.run(case.base))


def test_switching_leaves_graphs_weights_and_flags_alone(case: Case) -> None:
    model = case.stacked
    graphs = {n: str(m.graph) for n, m in graph_modules(model)}
    params = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    model.train()
    try:
        set_active(model, "c")
        with disable_adapters(model):
            pass
        assert all(m.training for m in model.modules())
        assert {n: str(m.graph) for n, m in graph_modules(model)} == graphs
        assert {n: (p, p.requires_grad) for n, p in model.named_parameters()} == params
    finally:
        model.eval()


def test_inactive_nodes_are_marked_for_diagrams(case: Case) -> None:
    set_active(case.stacked, "a")
    marked = {n.meta["surgery"]["adapter"] for _, m in graph_modules(case.stacked)
              for n in m.graph.nodes if n.meta.get(INACTIVE_KEY)}
    assert marked == set(NAMES) - {"a"}
    set_active(case.stacked, None)
    assert not any(n.meta.get(INACTIVE_KEY) for _, m in graph_modules(case.stacked)
                   for n in m.graph.nodes)


def test_set_trainable_only_changes_requires_grad(case: Case) -> None:
    model = case.stacked
    set_active(model, ["a", "b"])
    set_trainable(model, "b")
    expected = adapter_params(model, "b")
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in expected.values()}
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in expected.values()}
    assert active_adapters(model) == ["a", "b"]  # active set untouched
    out = model(*case.args, **case.kwargs)
    (out if isinstance(out, torch.Tensor) else out.logits).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(expected)  # a is active but frozen; base frozen
    model.zero_grad(set_to_none=True)
    set_trainable(model, [])
    assert trainable_parameters(model) == []
    set_trainable(model, None)
    n_adapter = sum(len(adapter_params(model, k)) for k in NAMES)
    assert len(trainable_parameters(model)) == n_adapter


def test_unknown_names(case: Case) -> None:
    with pytest.raises(AdapterNotFoundError,
                       match=r"no adapter named 'gg'; adapters present \(nearest first\): 'g', "):
        set_active(case.stacked, ["a", "gg"])
    assert sorted(active_adapters(case.stacked)) == sorted(NAMES)  # nothing changed
    with pytest.raises(AdapterNotFoundError, match="set_trainable: the model has no adapter"):
        set_trainable(case.stacked, "zz")
    with pytest.raises(ConfigError, match="names must be an adapter name"):
        set_active(case.stacked, [1, 2])


def test_merged_adapter_cannot_be_switched_off(zoo) -> None:
    model = apply_passes(zoo.traced("builtin"), [LoRAPass(rank=2, name="a"),
                                                 LoRAPass(rank=2, name="b")])
    merged = apply_passes(model, [MergeLoRAPass(names=["a"])])
    before = merged_adapters(merged)
    with pytest.raises(MergeError, match=r"adapter 'a' is merged into the weights .*"
                                         r"UnmergeLoRAPass\(names=\['a'\]\)"):
        set_active(merged, "b")
    with pytest.raises(MergeError, match="disable_adapters: adapter 'a' is merged"):
        with disable_adapters(merged):
            pass
    assert active_adapters(merged) == ["a", "b"]
    set_active(merged, "a")  # keeping the merged one on is fine
    assert active_adapters(merged) == ["a"] and merged_adapters(merged) == before


def test_a_plain_model_has_no_adapters() -> None:
    model = nn.Linear(2, 2)
    assert adapter_names(model) == {} and active_adapters(model) == []
    with pytest.raises(AdapterNotFoundError, match="carries no adapter"):
        set_active(model, "a")
    set_active(model, None)


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_inactive_modules_contribute_exactly_nothing() -> None:
    model = One()
    with torch.no_grad():  # -x · 0 + (-0.0): the base output is -0.0, and must stay so
        model.proj.weight.zero_()
        model.proj.bias.fill_(-0.0)
    from surgery import trace

    with pytest.warns(UserWarning, match="rank 8 is larger than"):  # a 1 -> 4 layer
        adapted = apply_passes(trace(model), [LoRAPass(pattern="proj", dropout=0.5, name="a"),
                                              IA3Pass(pattern="proj", name="c")])
    randomize(adapted)
    adapted.train()
    x = -torch.rand(3, 1) - 0.1
    set_active(adapted, [])
    rng = torch.get_rng_state()
    out = adapted(x)
    assert torch.equal(torch.get_rng_state(), rng)  # inactive dropout draws nothing
    assert torch.equal(out, model(x)) and bool(torch.signbit(out).all())  # bit for bit
    ia3 = adapted.get_submodule("proj.ia3_l.c")
    assert ia3(x) is x
    set_active(adapted, "a")
    adapted(x)
    assert not torch.equal(torch.get_rng_state(), rng)  # active dropout does draw
    adapted.eval()
    assert not torch.equal(adapted(x), model(x))


def test_set_trainable_leaves_merged_adapters_frozen() -> None:
    from surgery.apply import named_trainable_parameters
    from surgery.zoo import load_model

    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [LoRAPass(name="x"), LoRAPass(pattern="up_proj", name="y")])
    merged = apply_passes(adapted, [MergeLoRAPass(names=["x"])])
    set_trainable(merged, None)
    names = {n.split(".")[-2] for n, _ in named_trainable_parameters(merged)}
    assert names == {"y"}

"""Tests of surgery/adapters/active.py: switching named adapters on and off, and which train.

A stack of named adapters of every kind sits on one base (LoRA ``a`` and ``b``, IA³ ``c``,
then IA³ ``e`` on top of the LoRA query projections, a serial adapter ``s``, a parallel
adapter ``p``, a gated prefix ``g``), applied in two ``apply_passes`` calls. Each adapter
alone is also applied to the same base with the stack's parameter values copied in;
switching the stack to that adapter must give its outputs bit for bit (``torch.equal``), on
a hand-written model (map by torch.fx) and on LLaMA (map by torch.export).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from passes.adapters import SerialAdapterPass
from passes.merge import MergeLoRAPass, merged_adapters
from passes.parallel_adapter import ParallelAdapterPass
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
    list_targets,
    trainable_parameters,
)
from surgery.adapters.active import (
    INACTIVE_KEY,
    active_adapters,
    adapter_names,
    disable_adapters,
    is_disabled,
    merged_names,
    set_active,
    set_trainable,
)
from surgery.sites.marker import slot_parameters
from surgery.sites.site_graph import site_graphs

FIRST: dict[str, Pass] = {
    "a": LoRAPass(role=["query", "key", "value", "attn_out"], rank=4, name="a"),
    "b": LoRAPass(role=["query", "value"], rank=2, name="b"),
    "c": IA3Pass(name="c"),  # keys, values (output scaling), ffn down (input scaling)
}
SECOND: dict[str, Pass] = {
    "e": IA3Pass(role="query", name="e"),  # on top of a and b at the query projections
    "s": SerialAdapterPass(bottleneck=8, name="s"),
    "p": ParallelAdapterPass(bottleneck=8, name="p"),
    "g": PrefixPass(length=3, gate="zero", name="g"),
}
NAMES = [*FIRST, *SECOND]
# In module order: the query projection carries a, b and e before the key projection's c;
# the attention output's s, then the attention's g, then the feed-forward block's p.
KINDS = {"a": ("lora",), "b": ("lora",), "e": ("ia3",), "c": ("ia3",), "s": ("serial_adapter",),
         "g": ("prefix",), "p": ("parallel_adapter",)}


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
    """Adapter ``name``'s parameters: its modules' own, and its entries in parameter slots
    (``<site>.ia3_l.<name>``)."""
    return {f"{q}.{n}": p for q, m in model.named_modules()
            if isinstance(m, AdapterModule) and m.adapter_name == name
            for n, p in m.named_parameters(recurse=False)} | {
        q: p for q, p, _, adapter in slot_parameters(model) if adapter == name}


def inactive_marks(model: nn.Module) -> set[str]:
    """Adapter names of the site-graph nodes marked inactive."""
    return {n.meta["surgery"]["adapter"] for _, sg in site_graphs(model)
            for n in sg.graph.nodes if n.meta.get(INACTIVE_KEY)}


def tagged(model: nn.Module) -> set[str]:
    """Adapter names with nodes in the site graphs (a prefix reached through transformers'
    attention interface has none)."""
    return {n.meta["surgery"]["adapter"] for _, sg in site_graphs(model)
            for n in sg.graph.nodes if n.meta.get("surgery", {}).get("adapter")}


class Case:
    """A zoo model, the stack applied to it, each adapter alone, and inputs."""

    def __init__(self, zoo, name: str) -> None:
        spec = zoo.spec(name)
        self.base = spec.model
        self.args, self.kwargs = spec.example_inputs, spec.example_kwargs
        # One map for every apply_passes below: passes selecting by role read it, and copies
        # of a model share its cached map.
        mapped = apply_passes(spec.model, [], self.args, self.kwargs)
        list_targets(mapped)
        stacked = apply_passes(mapped, list(FIRST.values()))
        self.stacked = apply_passes(stacked, list(SECOND.values()))  # a second call
        randomize(self.stacked)
        self.alone = {}
        for key, p in {**FIRST, **SECOND}.items():
            only = apply_passes(mapped, [p])
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
    assert list(adapter_names(case.stacked).items()) == list(KINDS.items())  # module order
    assert list(adapter_names(case.stacked)) == active_adapters(case.stacked)
    assert case.stacked._surgery.active is None
    assert isinstance(case.stacked, type(case.base))  # the user's model, adapters inside


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
    assert not any(is_disabled(m) for m in case.stacked.modules() if isinstance(m, AdapterModule))


def test_disable_blocks_nest(case: Case) -> None:
    mods = [m for m in case.stacked.modules() if isinstance(m, AdapterModule)]
    with disable_adapters(case.stacked):
        with disable_adapters(case.stacked):
            assert all(is_disabled(m) for m in mods)
        assert all(is_disabled(m) and not m.active for m in mods)  # the outer block still holds
        assert torch.equal(case.run(case.stacked), case.run(case.base))
        inside = copy.deepcopy(case.stacked)  # a snapshot: its flags are off, nothing holds it
    assert not any(is_disabled(m) for m in mods)
    assert not any(is_disabled(m) for m in inside.modules() if isinstance(m, AdapterModule))
    assert active_adapters(inside) == []
    assert sorted(active_adapters(case.stacked)) == sorted(NAMES)


def test_empty_list_switches_everything_off(case: Case) -> None:
    set_active(case.stacked, [])
    assert active_adapters(case.stacked) == []
    assert torch.equal(case.run(case.stacked), case.run(case.base))


def test_switching_leaves_site_graphs_weights_and_flags_alone(case: Case) -> None:
    model = case.stacked
    code = {n: sg.code for n, sg in site_graphs(model)}
    params = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    model.train()
    try:
        set_active(model, "c")
        with disable_adapters(model):
            pass
        assert all(m.training for m in model.modules())
        assert {n: sg.code for n, sg in site_graphs(model)} == code
        assert {n: (p, p.requires_grad) for n, p in model.named_parameters()} == params
    finally:
        model.eval()


def test_inactive_nodes_are_marked_for_diagrams(case: Case) -> None:
    drawn = tagged(case.stacked)
    assert drawn >= set(NAMES) - {"g"}
    set_active(case.stacked, "a")
    assert inactive_marks(case.stacked) == drawn - {"a"}
    with disable_adapters(case.stacked):
        assert inactive_marks(case.stacked) == drawn
    assert inactive_marks(case.stacked) == drawn - {"a"}
    set_active(case.stacked, None)
    assert inactive_marks(case.stacked) == set()


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
                       match=r"no adapter named 'aa'; adapters present \(nearest first\): 'a', "):
        set_active(case.stacked, ["b", "aa"])
    assert sorted(active_adapters(case.stacked)) == sorted(NAMES)  # nothing changed
    with pytest.raises(AdapterNotFoundError, match="set_trainable: the model has no adapter"):
        set_trainable(case.stacked, "zz")
    with pytest.raises(ConfigError, match="names must be an adapter name"):
        set_active(case.stacked, [1, 2])


def test_switches_survive_copies(case: Case) -> None:
    set_active(case.stacked, ["a", "e"])
    expected = case.run(case.stacked)
    buf = io.BytesIO()
    torch.save(case.stacked, buf)
    buf.seek(0)
    copies = [copy.deepcopy(case.stacked), pickle.loads(pickle.dumps(case.stacked)),
              torch.load(buf, weights_only=False)]
    for other in copies:
        assert active_adapters(other) == ["a", "e"] and other._surgery.active == {"a", "e"}
        assert inactive_marks(other) == tagged(case.stacked) - {"a", "e"}
        assert torch.equal(case.run(other), expected)
        with disable_adapters(other):
            assert torch.equal(case.run(other), case.run(case.base))
        set_active(other, "b")  # switching a copy leaves the original alone
        assert torch.equal(case.run(other), case.run(case.alone["b"]))
    assert active_adapters(case.stacked) == ["a", "e"]


def test_a_plain_model_has_no_adapters() -> None:
    model = nn.Linear(2, 2)
    assert adapter_names(model) == {} and active_adapters(model) == []
    assert merged_names(model) == {}
    with pytest.raises(AdapterNotFoundError, match="carries no adapter"):
        set_active(model, "a")
    set_active(model, None)


def test_a_model_that_is_one_layer() -> None:
    layer = nn.Linear(8, 4)
    adapted = apply_passes(layer, [LoRAPass(pattern="*", rank=2, name="a"),
                                   IA3Pass(pattern="*", name="c")])
    randomize(adapted)
    x = torch.randn(3, 8)
    assert adapter_names(adapted) == {"a": ("lora",), "c": ("ia3",)}
    with disable_adapters(adapted):
        assert torch.equal(adapted(x), layer(x))
    set_active(adapted, "c")
    assert torch.equal(adapted(x), layer(x) * adapted.get_parameter("ia3_l.c").reshape(-1))
    assert inactive_marks(adapted) == {"a"}


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
    with pytest.warns(UserWarning, match="rank 8 is larger than"):  # a 1 -> 4 layer
        adapted = apply_passes(model, [LoRAPass(pattern="proj", dropout=0.5, name="a"),
                                       IA3Pass(pattern="proj", name="c")])
    randomize(adapted)
    adapted.train()
    x = -torch.rand(3, 1) - 0.1
    set_active(adapted, [])
    rng = torch.get_rng_state()
    out = adapted(x)
    assert torch.equal(torch.get_rng_state(), rng)  # inactive dropout draws nothing
    assert torch.equal(out, model(x)) and bool(torch.signbit(out).all())  # bit for bit
    ia3 = adapted.get_submodule("proj.ia3.c")
    assert ia3(x, adapted.get_parameter("proj.ia3_l.c")) is x
    set_active(adapted, "a")
    adapted(x)
    assert not torch.equal(torch.get_rng_state(), rng)  # active dropout does draw
    adapted.eval()
    assert not torch.equal(adapted(x), model(x))


def test_merged_adapter_cannot_be_switched_off(zoo) -> None:
    model = apply_passes(zoo.spec("builtin").model, [LoRAPass(rank=2, name="a"),
                                                     LoRAPass(rank=2, name="b")])
    merged = apply_passes(model, [MergeLoRAPass(names=["a"])])
    before = merged_adapters(merged)
    assert merged_names(merged) == {"a": [f"lora@layers.{i}.attn.{p}_proj"
                                          for i in (0, 1) for p in "qv"]}
    with pytest.raises(MergeError, match=r"adapter 'a' is merged into the weights .*"
                                         r"UnmergeLoRAPass\(names=\['a'\]\)"):
        set_active(merged, "b")
    with pytest.raises(MergeError, match="disable_adapters: adapter 'a' is merged"):
        with disable_adapters(merged):
            pass
    assert active_adapters(merged) == ["a", "b"]
    set_active(merged, "a")  # keeping the merged one on is fine
    assert active_adapters(merged) == ["a"] and merged_adapters(merged) == before


def test_set_trainable_leaves_merged_adapters_frozen(zoo) -> None:
    from surgery.apply import named_trainable_parameters

    adapted = apply_passes(zoo.spec("builtin").model,
                           [LoRAPass(name="x"), LoRAPass(pattern="up_proj", name="y")])
    merged = apply_passes(adapted, [MergeLoRAPass(names=["x"])])
    set_trainable(merged, None)
    names = {n.split(".")[-2] for n, _ in named_trainable_parameters(merged)}
    assert names == {"y"}

"""Tests of passes/lora.py: the math, the site-graph rewrite, shared layers and repeated adapters."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import Shared
from torch import nn

from passes.modules import LoRADropout, LoRAProjection
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    LoRAPass,
    apply_passes,
    named_trainable_parameters,
    trace,
)
from surgery.map.graphs import call_sites

REL_TOL = 1e-6  # float32 result against a float64 reference, relative to the output's size


class One(nn.Module):
    """A single layer, so the adapted output is exactly the layer's output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _conv1d(nf: int, nx: int) -> nn.Module:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _set_random(mod: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen, dtype=mod.weight.dtype))
    return mod.weight.detach()


def _lora(model: nn.Module, site: str, name: str = "default") -> tuple[nn.Module, nn.Module]:
    layer = model.get_submodule(site)
    return layer.lora_A[name], layer.lora_B[name]


def _assert_rel_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= REL_TOL * want.abs().max().item(), f"error {err:.3g} vs scale {want.abs().max():.3g}"


# ---- the math ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapted_output_is_base_plus_scaled_low_rank_update(kind: str, use_rslora: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 20) if kind == "linear" else _conv1d(20, 12)  # non-square on purpose
    model = One(layer)
    adapted = apply_passes(model, [LoRAPass(pattern="layer", rank=3, alpha=6, use_rslora=use_rslora)])
    lora_a, lora_b = _lora(adapted, "layer")
    assert lora_a.weight.shape == (3, 12) and lora_b.weight.shape == (20, 3)
    a, b = _set_random(lora_a, 1), _set_random(lora_b, 2)
    scaling = 6 / math.sqrt(3) if use_rslora else 6 / 3
    assert lora_b.scaling == pytest.approx(scaling) and lora_a.rank == 3 and lora_b.alpha == 6
    x = torch.randn(4, 5, 12)
    base = layer(x).double()
    want = base + scaling * (x.double() @ a.double().T @ b.double().T)
    _assert_rel_close(adapted(x), want)
    assert type(adapted) is One and type(adapted.layer).__name__ == type(layer).__name__
    scale_nodes = [n for n in adapted.layer.graph.nodes
                   if (n.meta.get("surgery") or {}).get("part") == "scale"]
    assert [n.args[1] for n in scale_nodes] == [pytest.approx(scaling)]


def test_b_starts_at_zero_and_kaiming_a_follows_linear_init() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="rank 64 is larger than"):
        adapted = apply_passes(One(nn.Linear(1024, 16)), [LoRAPass(pattern="layer", rank=64)])
    lora_a, lora_b = _lora(adapted, "layer")
    assert torch.equal(lora_b.weight, torch.zeros(16, 64))
    bound = 1 / math.sqrt(1024)  # kaiming_uniform with a=sqrt(5)
    assert lora_a.weight.abs().max() <= bound
    assert lora_a.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_gaussian_init_std_is_one_over_rank() -> None:
    torch.manual_seed(0)
    adapted = apply_passes(One(nn.Linear(2048, 16)), [LoRAPass(pattern="layer", rank=8, init="gaussian")])
    lora_a, lora_b = _lora(adapted, "layer")
    assert lora_a.weight.std().item() == pytest.approx(1 / 8, rel=0.03)
    assert lora_a.weight.mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.equal(lora_b.weight, torch.zeros_like(lora_b.weight))


def test_dropout_in_train_mode_touches_only_the_branch() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    adapted = apply_passes(One(layer), [LoRAPass(pattern="layer", rank=4, alpha=8, dropout=0.5)])
    x = torch.randn(6, 16)
    adapted.train()
    assert torch.equal(adapted(x), layer(x)), "B = 0: dropout on the branch leaves outputs exact"
    lora_a, lora_b = _lora(adapted, "layer")
    a, b = lora_a.weight.detach(), _set_random(lora_b, 3)
    torch.manual_seed(5)
    got = adapted(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, True)
    assert not torch.equal(dropped, x)
    _assert_rel_close(got, layer(x).double() + 2.0 * (dropped.double() @ a.double().T @ b.double().T))
    adapted.eval()
    _assert_rel_close(adapted(x), layer(x).double() + 2.0 * (x.double() @ a.double().T @ b.double().T))
    assert torch.equal(adapted(x), adapted(x))


def test_adapter_modules_follow_the_weight_dtype_and_layout() -> None:
    model = One(nn.Linear(6, 10).double())
    adapted = apply_passes(model, [LoRAPass(pattern="layer", rank=2, dropout=0.1, name="task")])
    layer = adapted.get_submodule("layer")
    assert isinstance(layer.lora_A["task"], LoRAProjection) and layer.lora_A["task"].factor == "A"
    assert isinstance(layer.lora_B["task"], LoRAProjection) and layer.lora_B["task"].factor == "B"
    assert isinstance(layer.lora_dropout["task"], LoRADropout) and layer.lora_dropout["task"].p == 0.1
    assert layer.lora_A["task"].weight.dtype == torch.float64
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == [
        "layer.lora_A.task.weight", "layer.lora_B.task.weight"]
    parts = [(n.meta["surgery"]["part"], n.meta["surgery"]["adapter"]) for n in layer.graph.nodes
             if "surgery" in n.meta]
    assert parts == [(p, "task") for p in ("lora_dropout", "lora_A", "lora_B", "scale", "add")]
    add = next(n for n in layer.graph.nodes if n.meta.get("surgery", {}).get("part") == "add")
    assert list(add.users)[0].op == "output", "the site's output is the sum"
    assert add.target is operator.add and add.meta["surgery"]["site"] == "layer"
    assert add.meta["surgery"]["pass"] == "lora"


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be a positive int"),
    ({"rank": 2.0}, "rank must be a positive int"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"alpha": float("nan")}, "alpha must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "xavier"}, "init must be one of 'kaiming', 'gaussian', 'orthogonal', 'random', "
                         "'pissa', 'pissa_niter_<K>', 'olora', got 'xavier'"),
    ({"name": "my.adapter"}, r"name 'my\.adapter' contains '\.'"),
    ({"name": 3}, "name must be a str"),
    ({"pattern": ""}, "a pattern must be a non-empty string"),
])
def test_invalid_configuration(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRAPass(**kwargs)


def test_pass_is_frozen_and_keyword_only() -> None:
    p = LoRAPass(pattern=["a", "b"], rank=4)
    assert p.pattern == ("a", "b") and p.adapter_name == "default" and LoRAPass.name == "lora"
    with pytest.raises(Exception):
        p.rank = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoRAPass("attn.*")  # type: ignore[misc]


# ---- a layer called twice -----------------------------------------------------------------


def test_shared_layer_gets_one_adapter_used_at_both_calls() -> None:
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 5, 8)
    assert len(call_sites(trace(model))["proj"]) == 2, "the map sees two calls"
    adapted = apply_passes(model, [LoRAPass(pattern="proj", rank=2, alpha=4)])
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == [
        "proj.lora_A.default.weight", "proj.lora_B.default.weight"]
    assert torch.equal(adapted(x), model(x))

    lora_a, lora_b = _lora(adapted, "proj")
    _set_random(lora_b, 4)
    adapted(x).pow(2).sum().backward()

    # reference: the same update written by hand at both calls
    a = lora_a.weight.detach().clone().requires_grad_()
    b = lora_b.weight.detach().clone()

    def proj(h: torch.Tensor) -> torch.Tensor:
        return model.proj(h) + 2.0 * (h @ a.T @ b.T)

    out = model.head(proj(torch.relu(proj(x))))
    out.pow(2).sum().backward()
    torch.testing.assert_close(lora_a.weight.grad, a.grad, rtol=1e-5, atol=1e-6)

    # one call alone gives a different gradient: both calls contribute
    a1 = lora_a.weight.detach().clone().requires_grad_()
    model.head(model.proj(torch.relu(model.proj(x) + 2.0 * (x @ a1.T @ b.T)))).pow(2).sum().backward()
    assert not torch.allclose(a1.grad, a.grad, rtol=1e-3)
    for p in model.parameters():
        p.grad = None


# ---- adapting a layer twice ------------------------------------------------------------------


def test_same_name_twice_raises_and_changes_nothing(zoo, snapshot) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass()])
    before = snapshot(adapted)
    with pytest.raises(AlreadyAdaptedError,
                       match=r"LoRAPass: layers.0.attn.q_proj \(Linear\) already has an adapter named "
                             r"'default' in slot 'lora_A'. Way out: give the pass another "
                             r"name=\.\.\."):
        apply_passes(adapted, [LoRAPass()], inplace=True)
    before.assert_unchanged(adapted)
    with pytest.raises(AlreadyAdaptedError):
        apply_passes(adapted, [LoRAPass(pattern="v_proj")])
    before.assert_unchanged(adapted)


def test_another_name_gives_two_adapters_on_one_layer(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    site = "layers.0.attn.q_proj"
    once = apply_passes(spec.model, [LoRAPass(pattern=site, rank=2)])
    twice = apply_passes(once, [LoRAPass(pattern=site, rank=3, alpha=6, name="second")])
    assert sorted(twice.get_submodule(site).lora_A.keys()) == ["default", "second"]
    assert list(once.get_submodule(site).lora_A.keys()) == ["default"], "the input is left alone"
    assert sorted(n for n, _ in named_trainable_parameters(twice)) == sorted(
        f"{site}.lora_{f}.{a}.weight" for f in "AB" for a in ("default", "second"))
    assert torch.equal(run_model(twice, spec), run_model(spec.model, spec))


def test_two_named_adapters_both_act() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 14)
    adapted = apply_passes(One(layer), [LoRAPass(pattern="layer", rank=2, alpha=2)])
    adapted = apply_passes(adapted, [LoRAPass(pattern="layer", rank=3, alpha=6, name="second")])
    a1, b1 = _lora(adapted, "layer")
    a2, b2 = _lora(adapted, "layer", "second")
    a1, b1, a2, b2 = a1.weight.detach(), _set_random(b1, 1), a2.weight.detach(), _set_random(b2, 2)
    x = torch.randn(5, 10).double()
    want = (layer(x.float()).double() + 1.0 * (x @ a1.double().T @ b1.double().T)
            + 2.0 * (x @ a2.double().T @ b2.double().T))
    _assert_rel_close(adapted(x.float()), want)


@pytest.mark.parametrize("how", ["weight_norm", "prune"])
def test_a_layer_with_a_computed_weight_is_refused_with_the_way_out(how: str, snapshot) -> None:
    from torch.nn.utils import parametrizations, prune

    from surgery import UnsupportedSiteError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    if how == "weight_norm":
        parametrizations.weight_norm(model[0])
        what = r"parametrised \(torch.nn.utils.parametrize\).*parametrize.remove_parametrizations"
    else:
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        what = r"pruned \(torch.nn.utils.prune\).*\(torch.nn.utils.prune.remove\(layer"
    before = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=rf"LoRAPass: 0 \(\w+\) has a weight that is "
                                                   rf"{what}"):
        apply_passes(model, [LoRAPass(pattern="0", rank=2)])
    before.assert_unchanged(model)
    adapted = apply_passes(model, [LoRAPass(pattern="2", rank=2)])
    assert hasattr(adapted[2], "lora_A")


@pytest.mark.parametrize(("given", "ours"), [
    ({"r": 8}, "r= is rank=. Way out: LoRAPass(rank=8)."),
    ({"lora_alpha": 16}, "lora_alpha= is alpha=. Way out: LoRAPass(alpha=16)."),
    ({"target_modules": ["q_proj", "v_proj"]},
     "target_modules= is pattern=. Way out: LoRAPass(pattern=['q_proj', 'v_proj'])."),
    ({"lora_dropout": 0.1}, "lora_dropout= is dropout=. Way out: LoRAPass(dropout=0.1)."),
])
def test_peft_spellings_are_answered_with_ours(given: dict, ours: str) -> None:
    with pytest.raises(ConfigError) as info:
        LoRAPass(**given)
    msg = str(info.value)
    assert msg.startswith(f"LoRAPass: {next(iter(given))}=: PEFT's spelling")
    assert msg.endswith(ours)


def test_an_unknown_keyword_lists_the_arguments_nearest_first() -> None:
    with pytest.raises(ConfigError, match=r"^LoRAPass: no argument rnak=; nearest: rank=, ") as info:
        LoRAPass(rnak=4)
    listed = str(info.value).splitlines()[0].split("nearest: ")[1].split(", ")
    assert sorted(listed) == sorted(f"{k}=" for k in LoRAPass().config())

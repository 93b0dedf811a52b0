"""Tests of per-site rank and alpha in passes/lora.py (``LoRAPass(rank_for=..., alpha_for=...)``):
the first matching key wins, every reader of rank and scaling sees the site's own values, the
configuration round-trips, bad keys fail early or loudly, and the outputs equal PEFT's
``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import randomize_adapters
from torch import nn

from passes.lora import LoRAPass
from passes.merge import MergeLoRAPass
from surgery import ConfigError, NoMatchError, apply_passes, audit, plan
from surgery.adapters.unload import unload
from surgery.sites.params import adapter_parameters

Q0, Q1 = "layers.0.attn.q_proj", "layers.1.attn.q_proj"
V0, V1 = "layers.0.attn.v_proj", "layers.1.attn.v_proj"
D = 64  # width of the built-in tiny transformer's projections


def _branch(model: nn.Module, site: str, name: str = "default") -> tuple[nn.Module, nn.Module]:
    layer = model.get_submodule(site)
    return layer.lora_A[name], layer.lora_B[name]


def _scale_args(model: nn.Module, site: str) -> list[float]:
    return [n.args[1] for n in model.get_submodule(site).graph.nodes
            if (n.meta.get("surgery") or {}).get("part") == "scale"]


# ---- which value a site takes -----------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_site_takes_the_first_matching_key_everywhere(zoo, use_rslora: bool) -> None:
    p = LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8, use_rslora=use_rslora,
                 rank_for=[(Q0, 2), ("q_proj", 6), ("re:layers\\.0\\..*", 12)],
                 alpha_for={"v_proj": 3, "layers.1.*.*": 5.5})
    want = {Q0: (2, 8.0), Q1: (6, 5.5), V0: (12, 3.0), V1: (4, 3.0)}  # (rank, alpha)
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [p])
    changes = adapted._surgery.history[0].changes
    for site, (rank, alpha) in want.items():
        scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        assert (p.rank_at(site), p.alpha_at(site)) == (rank, alpha)
        assert p.scaling_at(site) == scaling
        lora_a, lora_b = _branch(adapted, site)
        assert lora_a.weight.shape == (rank, D) and lora_b.weight.shape == (D, rank)
        for mod in (lora_a, lora_b):
            assert (mod.rank, mod.alpha, mod.scaling) == (rank, alpha, scaling)
        assert lora_b.low_rank(adapted.get_submodule(site))[2] == scaling  # what merge reads
        assert _scale_args(adapted, site) == [scaling]  # what the graph computes
        here = [c for c in changes if c.site == site and c.kind in ("node_added", "param_added")]
        assert len(here) == 7 and {c.detail for c in here} == {
            f"rank {rank}, alpha {alpha:g}, scaling {scaling:g}"}
        assert [c.shape for c in here if c.kind == "param_added"] == [(rank, D), (D, rank)]
    assert p.scaling == 8 / (math.sqrt(4) if use_rslora else 4)  # the default is unchanged
    summary = audit(adapted).adapters[0]
    assert summary.ranks == (2, 12, 6, 4) and summary.rank_text == "ranks 2-12"
    assert str(audit(adapted)).splitlines()[1].endswith(", ranks 2-12")


def test_outputs_are_each_site_s_own_update(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    p = LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8, rank_for={"layers.1.*.*": 2},
                 alpha_for={"v_proj": 1.0})
    adapted = apply_passes(spec.model, [p])
    randomize_adapters(adapted, seed=3)
    y = run_model(adapted, spec)
    # the same update written into the base weights by hand, in float64
    merged = apply_passes(spec.model, [])
    with torch.no_grad():
        for site in (Q0, Q1, V0, V1):
            assert p.scaling_at(site) == {Q0: 8 / 4, Q1: 8 / 2, V0: 1 / 4, V1: 1 / 2}[site]
            lora_a, lora_b = _branch(adapted, site)
            layer = merged.get_submodule(site)
            delta = p.scaling_at(site) * lora_b.weight.double() @ lora_a.weight.double()
            layer.weight = nn.Parameter((layer.weight.double() + delta).float())
    want = run_model(merged, spec)
    assert (y - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    # merge and unload fold each site with its own scaling
    folded = run_model(apply_passes(adapted, [MergeLoRAPass()]), spec)
    assert (folded - y).abs().max() <= 1e-5 * (1 + y.abs().max())
    assert (run_model(unload(adapted), spec) - y).abs().max() <= 1e-5 * (1 + y.abs().max())


def test_plan_and_a_shared_name_see_the_same_ranks(zoo) -> None:
    p = LoRAPass(pattern="q_proj", rank=4, rank_for={Q1: 8})
    changes = plan(zoo.spec("builtin:tiny").model, [p])[0].changes
    shapes = {c.name: c.shape for c in changes if c.kind == "param_added"}
    assert shapes == {f"{Q0}.lora_A.default.weight": (4, D), f"{Q0}.lora_B.default.weight": (D, 4),
                      f"{Q1}.lora_A.default.weight": (8, D), f"{Q1}.lora_B.default.weight": (D, 8)}
    # a module shared under two names takes the first key selecting any of them
    assert p.rank_at(["x.q_proj", Q1]) == 8 and p.rank_at("x.q_proj") == 4


def test_a_rank_above_a_layer_s_size_warns_for_that_layer_only() -> None:
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 16))
    with pytest.warns(UserWarning, match=r"rank 8 is larger than min\(in_features, "
                                         r"out_features\) of 1 \(Linear, 4 -> 16\)") as record:
        apply_passes(model, [LoRAPass(pattern="re:[01]", rank=2, rank_for={"1": 8})])
    assert len([w for w in record if "larger than" in str(w.message)]) == 1


# ---- the configuration --------------------------------------------------------------------------


def test_configuration_round_trips_and_stays_hashable() -> None:
    p = LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=16, use_rslora=True, name="task",
                 rank_for={"layers.0.*.q_proj": 8, "re:.*v_proj": 2},
                 alpha_for=[("v_proj", 4), ("q_proj", 2.5)])
    assert p.rank_for == (("layers.0.*.q_proj", 8), ("re:.*v_proj", 2))
    assert p.alpha_for == (("v_proj", 4.0), ("q_proj", 2.5))
    config = p.config()
    assert config["rank_for"] == [["layers.0.*.q_proj", 8], ["re:.*v_proj", 2]]
    assert config["alpha_for"] == [["v_proj", 4.0], ["q_proj", 2.5]]
    assert LoRAPass.from_config(config) == p
    assert LoRAPass.from_config(json.loads(json.dumps(config))) == p
    assert hash(LoRAPass.from_config(json.loads(json.dumps(config)))) == hash(p)
    # a mapping and a list of pairs in the same order are the same pass; order matters
    same = LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=16, use_rslora=True, name="task",
                    rank_for=[["layers.0.*.q_proj", 8], ["re:.*v_proj", 2]],
                    alpha_for={"v_proj": 4.0, "q_proj": 2.5})
    assert same == p and {same, p} == {p}
    assert LoRAPass(rank_for={"a": 1, "b": 2}) != LoRAPass(rank_for={"b": 2, "a": 1})
    assert LoRAPass.from_config(LoRAPass().config()) == LoRAPass()
    assert LoRAPass().rank_for == () and LoRAPass(rank_for={}).rank_for == ()
    assert "rank_for=(('a', 1),)" in LoRAPass(rank_for={"a": 1}).describe()
    with pytest.raises(Exception):
        p.rank_for = ()  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,message", [
    ({"rank_for": {"re:(": 4}}, r"LoRAPass: rank_for key 're:\(': invalid regular expression"),
    ({"rank_for": {"": 4}}, r"LoRAPass: rank_for key '': a pattern must be a non-empty string"),
    ({"rank_for": {3: 4}}, r"LoRAPass: rank_for key 3: a pattern must be a string"),
    ({"rank_for": {"q_proj": 0}}, r"LoRAPass: rank_for\['q_proj'\]: a rank must be a positive int, "
                                  r"got 0"),
    ({"rank_for": {"q_proj": -2}}, r"rank_for\['q_proj'\]: a rank must be a positive int"),
    ({"rank_for": {"q_proj": 4.0}}, r"rank_for\['q_proj'\]: a rank must be a positive int"),
    ({"rank_for": {"q_proj": True}}, r"rank_for\['q_proj'\]: a rank must be a positive int"),
    ({"alpha_for": {"q_proj": float("nan")}}, r"LoRAPass: alpha_for\['q_proj'\]: an alpha must be "
                                              r"a positive finite number, got nan"),
    ({"alpha_for": {"q_proj": float("inf")}}, r"alpha_for\['q_proj'\]: an alpha must be a positive "
                                              r"finite number"),
    ({"alpha_for": {"q_proj": 0}}, r"alpha_for\['q_proj'\]: an alpha must be a positive"),
    ({"alpha_for": {"q_proj": "8"}}, r"alpha_for\['q_proj'\]: an alpha must be a positive"),
    ({"rank_for": [("q_proj", 4), ("q_proj", 8)]}, r"LoRAPass: rank_for gives pattern 'q_proj' "
                                                   r"twice"),
    ({"rank_for": "q_proj"}, r"LoRAPass: rank_for must be a mapping \{pattern: value\} or a list "
                             r"of \(pattern, value\) pairs"),
    ({"alpha_for": [("q_proj",)]}, r"LoRAPass: alpha_for must be a mapping"),
])
def test_bad_per_site_settings_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRAPass(**kwargs)


def test_a_key_selecting_no_selected_site_is_an_error(zoo, snapshot) -> None:
    model = zoo.spec("builtin:tiny").model
    before = snapshot(model)
    with pytest.raises(NoMatchError, match=r"LoRAPass: rank_for key 'q_prj' selects none of the 4 "
                                           r"site\(s\) the pass adapts\. Nearest sites: "
                                           r"layers\.0\.attn\.q_proj, layers\.1\.attn\.q_proj"):
        apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"], rank_for={"q_prj": 2})])
    # a key naming a layer that the selection leaves out says so
    with pytest.raises(NoMatchError, match=r"alpha_for key 'k_proj' selects none of the 4 "
                                           r"site\(s\).* It selects layers\.0\.attn\.k_proj, "
                                           r"layers\.1\.attn\.k_proj, which this pass does not "
                                           r"adapt\."):
        apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"], alpha_for={"k_proj": 2})])
    with pytest.raises(NoMatchError, match="rank_for key 'mlp.up_proj'"):
        plan(model, [LoRAPass(pattern="q_proj", rank_for={"q_proj": 2, "mlp.up_proj": 4})])
    before.assert_unchanged(model)


# ---- against PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_equal_peft_rank_pattern_and_alpha_pattern(zoo, run_model, use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    spec = zoo.spec("hf:llama")
    layer = "model.layers.{}.self_attn.{}"
    ranks = {layer.format(0, "q_proj"): 2, layer.format(1, "v_proj"): 6}
    alphas = {layer.format(0, "v_proj"): 3.0, layer.format(1, "q_proj"): 12.0}
    ours = apply_passes(spec.model, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8,
                                              use_rslora=use_rslora, rank_for=ranks,
                                              alpha_for=alphas)])
    randomize_adapters(ours, seed=1)
    reference = peft.get_peft_model(
        copy.deepcopy(spec.model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        use_rslora=use_rslora, rank_pattern=ranks, alpha_pattern=alphas))
    theirs = dict(reference.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in adapter_parameters(ours):
            target = theirs[f"base_model.model.{name}"]
            assert target.shape == param.shape, name
            target.copy_(param)
            copied += 1
    assert copied == 8
    for site in [layer.format(i, p) for i in range(2) for p in ("q_proj", "v_proj")]:
        assert ours.get_submodule(site).lora_B["default"].scaling == pytest.approx(
            reference.base_model.model.get_submodule(site).scaling["default"], rel=1e-15)
    reference.eval()
    y = run_model(ours, spec)
    want = run_model(reference, spec)
    assert not torch.equal(y, run_model(spec.model, spec)), "the adapters contribute"
    assert (y - want).abs().max() <= 1e-6 * (1 + want.abs().max())

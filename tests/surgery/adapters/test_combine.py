"""``surgery.combine_adapters``: weighted combination of LoRA adapters
(``surgery/adapters/combine.py``)."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import randomize_adapters
from torch import nn

from passes.merge import MergeLoRAPass, merged_adapters
from surgery import (
    AdapterModule,
    AdapterNotFoundError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    NoMatchError,
    active_adapters,
    apply_passes,
    set_active,
)
from surgery.adapters.combine import combine_adapters
from surgery.adapters.unload import unload
from surgery.audit import audit

SITES = [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]


def factors(model: nn.Module, site: str, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    mod = model.get_submodule(site)
    return mod.lora_A[name].weight, mod.lora_B[name].weight, mod.lora_B[name].scaling


@pytest.fixture(scope="module")
def three(zoo) -> nn.Module:
    """TinyTransformer with LoRA ``a`` (r=4, alpha=8), ``b`` (r=4, alpha=4) on q/v and ``c``
    (r=2, alpha=2) on ``layers.0.attn.q_proj`` only."""
    model = apply_passes(zoo.spec("builtin:tiny").model, [
        LoRAPass(rank=4, alpha=8, name="a"), LoRAPass(rank=4, alpha=4, name="b"),
        LoRAPass(pattern="layers.0.attn.q_proj", rank=2, alpha=2, name="c")])
    randomize_adapters(model)
    return model


def test_cat_stacks_ranks_and_sums_the_weighted_updates(three, snapshot, run_model, zoo) -> None:
    before = snapshot(three)
    rng = torch.get_rng_state()
    mixed = combine_adapters(three, {"a": 0.7, "b": -0.3}, method="cat", name="ab")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    before.assert_unchanged(three)
    for site in SITES:
        a_new, b_new, s_new = factors(mixed, site, "ab")
        (a1, b1, s1), (a2, b2, s2) = factors(three, site, "a"), factors(three, site, "b")
        assert s_new == 1.0 and a_new.shape == (8, 64) and b_new.shape == (64, 8)
        assert torch.equal(a_new, torch.cat([a1 * 0.7 * s1, a2 * -0.3 * s2]))
        assert torch.equal(b_new, torch.cat([b1, b2], dim=1))
        want = 0.7 * s1 * b1 @ a1 - 0.3 * s2 * b2 @ a2
        assert torch.allclose(b_new @ a_new, want, atol=1e-7)
        assert mixed.get_submodule(site).lora_A["ab"].weight.requires_grad
    # the new adapter is an ordinary LoRA adapter: it merges like any other
    y = run_model(mixed, zoo.spec("builtin:tiny"))
    merged = apply_passes(mixed, [MergeLoRAPass(names=["ab"])])
    assert (run_model(merged, zoo.spec("builtin:tiny")) - y).abs().max() <= 1e-5 * (1 + y.abs().max())


def test_linear_weights_factors_by_square_roots(three) -> None:
    mixed = combine_adapters(three, {"a": 0.7, "b": -0.3}, method="linear", name="lin")
    for site in SITES:
        a_new, b_new, s_new = factors(mixed, site, "lin")
        (a1, b1, s1), (a2, b2, s2) = factors(three, site, "a"), factors(three, site, "b")
        c1, c2 = 0.7 * s1, -0.3 * s2
        assert s_new == 1.0 and a_new.shape == (4, 64)
        assert torch.allclose(a_new, abs(c1) ** 0.5 * a1 - abs(c2) ** 0.5 * a2, atol=1e-7)
        assert torch.allclose(b_new, abs(c1) ** 0.5 * b1 + abs(c2) ** 0.5 * b2, atol=1e-7)


def test_sites_are_those_carrying_every_source(three) -> None:
    mixed = combine_adapters(three, {"a": 0.5, "c": 0.5}, method="cat", name="ac")
    sites = sorted({n.rsplit(".lora_", 1)[0] for n, _ in mixed.named_parameters() if ".ac." in n})
    assert sites == ["layers.0.attn.q_proj"]
    assert factors(mixed, "layers.0.attn.q_proj", "ac")[0].shape == (6, 64)


@pytest.mark.filterwarnings("ignore:Adapter name")  # PEFT warns about short adapter names
@pytest.mark.parametrize("method", ["linear", "cat"])
def test_factors_equal_peft_add_weighted_adapter(zoo, three, method: str) -> None:
    peft = pytest.importorskip("peft")
    base = zoo.fresh("builtin:tiny").model
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]),
                                adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for site in SITES:
            layer = model.base_model.model.get_submodule(site)
            for name in "ab":
                a, b, _ = factors(three, site, name)
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.3], "ab", combination_type=method)
    mixed = combine_adapters(three, {"a": 0.7, "b": -0.3}, method=method, name="ab")
    for site in SITES:
        layer = model.base_model.model.get_submodule(site)
        a_new, b_new, s_new = factors(mixed, site, "ab")
        assert torch.equal(a_new, layer.lora_A["ab"].weight)
        assert torch.equal(b_new, layer.lora_B["ab"].weight)
        assert s_new == layer.scaling["ab"]


def test_errors(three, snapshot) -> None:
    before = snapshot(three)
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'z'; LoRA adapters present: "
                                                   "'a', 'b', 'c'"):
        combine_adapters(three, {"a": 0.5, "z": 0.5})
    with pytest.raises(ConfigError, match=r"method='linear' needs equal ranks, got \[2, 4\]"):
        combine_adapters(three, {"a": 0.5, "c": 0.5}, method="linear")
    with pytest.raises(ConfigError, match="method must be one of"):
        combine_adapters(three, {"a": 0.5, "b": 0.5}, method="svd")
    with pytest.raises(ConfigError, match="already has an adapter named 'b'"):
        combine_adapters(three, {"a": 0.5}, name="b")
    with pytest.raises(ConfigError, match="must be a finite number"):
        combine_adapters(three, {"a": float("nan")})
    with pytest.raises(ConfigError, match="linear.*equal ranks"):
        combine_adapters(three, {"c": 1.0, "a": 1.0}, name="x", method="linear", inplace=True)
    before.assert_unchanged(three)


def test_no_layer_carrying_all_sources(zoo) -> None:
    model = apply_passes(zoo.spec("builtin:tiny").model, [
        LoRAPass(pattern="layers.0.attn.q_proj", name="a"),
        LoRAPass(pattern="layers.1.attn.q_proj", name="b")])
    with pytest.raises(NoMatchError, match=r"no layer carries all of \['a', 'b'\]"):
        combine_adapters(model, {"a": 0.5, "b": 0.5}, method="cat")


def test_only_the_combined_adapter_stays_active_so_its_update_counts_once(three, zoo,
                                                                          run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    flags = {n: m.active for n, m in three.named_modules() if isinstance(m, AdapterModule)}
    mixed = combine_adapters(three, {"a": 0.7, "b": -0.3}, method="cat", name="ab")
    assert active_adapters(mixed) == ["ab"]
    assert {n: m.active for n, m in three.named_modules() if isinstance(m, AdapterModule)} == flags
    y = run_model(mixed, spec)

    # base + combined delta: the base model with W + Σ w_i s_i B_i A_i at every site
    base = apply_passes(zoo.spec("builtin:tiny").model, [])
    with torch.no_grad():
        for site in SITES:
            (a1, b1, s1), (a2, b2, s2) = factors(three, site, "a"), factors(three, site, "b")
            layer = base.get_submodule(site)
            layer.weight = nn.Parameter(layer.weight + 0.7 * s1 * b1 @ a1 - 0.3 * s2 * b2 @ a2)
    want = run_model(base, spec)
    assert (y - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    # and bit for bit what a model carrying the combined adapter alone computes
    alone = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(rank=8, alpha=8, name="ab")])
    with torch.no_grad():
        for site in SITES:
            a_new, b_new, _ = factors(mixed, site, "ab")
            alone.get_submodule(site).lora_A["ab"].weight.copy_(a_new)
            alone.get_submodule(site).lora_B["ab"].weight.copy_(b_new)
    assert torch.equal(run_model(alone, spec), y)

    # merging and unloading leave the switched-off sources out too
    merged = apply_passes(mixed, [MergeLoRAPass()])
    assert set(merged_adapters(merged).values()) == {("lora:ab",)}
    with pytest.raises(MergeError, match="LoRA adapter 'a' is switched off"):
        apply_passes(mixed, [MergeLoRAPass(names=["a"])])
    assert (run_model(unload(mixed), spec) - y).abs().max() <= 1e-5 * (1 + y.abs().max())


def test_a_merged_source_cannot_be_combined(three, snapshot) -> None:
    merged = apply_passes(three, [MergeLoRAPass(names=["a"])])
    before = snapshot(merged)
    with pytest.raises(MergeError, match=r"source adapter 'a' is merged into the weights .*"
                                         r"UnmergeLoRAPass\(names=\['a'\]\)"):
        combine_adapters(merged, {"a": 0.5, "b": 0.5}, name="ab", inplace=True)
    before.assert_unchanged(merged)


def test_the_combined_branch_sits_inside_an_ia3_scaling_and_survives_pickle(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    model = apply_passes(spec.model, [LoRAPass(rank=4, name="a"), LoRAPass(rank=2, name="b"),
                                      IA3Pass(pattern="v_proj", name="v")])
    randomize_adapters(model, seed=6)
    mixed = combine_adapters(model, {"a": 0.5, "b": 2.0}, method="cat", name="ab")
    assert active_adapters(mixed) == ["ab"]
    set_active(mixed, ["ab", "v"])
    # the same model built directly: LoRA 'ab' alone, then the same IA³ vectors
    alone = apply_passes(spec.model, [LoRAPass(rank=6, alpha=6, name="ab"),
                                      IA3Pass(pattern="v_proj", name="v")])
    with torch.no_grad():
        for site in SITES:
            a_new, b_new, _ = factors(mixed, site, "ab")
            alone.get_submodule(site).lora_A["ab"].weight.copy_(a_new)
            alone.get_submodule(site).lora_B["ab"].weight.copy_(b_new)
            if site.endswith("v_proj"):
                alone.get_parameter(f"{site}.ia3_l.v").copy_(mixed.get_parameter(f"{site}.ia3_l.v"))
    y = run_model(mixed, spec)
    assert torch.equal(run_model(alone, spec), y)  # IA³ scales base + combined update
    copied = pickle.loads(pickle.dumps(mixed))
    assert set(active_adapters(copied)) == {"ab", "v"}
    assert torch.equal(run_model(copied, spec), y)
    assert [c.pass_name for c in mixed._surgery.history[-1:]] == ["combine_lora"]


# ---- ranks that differ from layer to layer -----------------------------------------------------


@pytest.fixture(scope="module")
def per_layer(zoo) -> nn.Module:
    """TinyTransformer with LoRA ``a`` and ``b`` whose ranks differ per layer: ``a`` built by
    two passes under one name (q r=4, v r=8), ``b`` by one pass with ``rank_for`` (same
    ranks, other alphas), ``c`` with ranks of its own (q r=2, v r=6)."""
    model = apply_passes(zoo.spec("builtin:tiny").model, [
        LoRAPass(pattern="q_proj", rank=4, alpha=8, name="a"),
        LoRAPass(pattern="v_proj", rank=8, alpha=4, name="a"),
        LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=2, rank_for={"v_proj": 8},
                 alpha_for={"v_proj": 16}, name="b"),
        LoRAPass(pattern=["q_proj", "v_proj"], rank=2, rank_for={"v_proj": 6}, name="c")])
    randomize_adapters(model, seed=4)
    return model


@pytest.mark.parametrize("method,sources", [("cat", "ab"), ("cat", "ac"), ("linear", "ab")])
def test_ranks_combine_site_by_site(per_layer, zoo, run_model, method: str, sources: str) -> None:
    spec = zoo.spec("builtin:tiny")
    weights = {sources[0]: 0.7, sources[1]: -0.3}
    mixed = combine_adapters(per_layer, weights, method=method, name="mix")
    for site in SITES:
        (a1, b1, s1), (a2, b2, s2) = (factors(per_layer, site, n) for n in sources)
        a_new, b_new, s_new = factors(mixed, site, "mix")
        rank = a1.shape[0] + a2.shape[0] if method == "cat" else a1.shape[0]
        assert s_new == 1.0 and a_new.shape == (rank, 64) and b_new.shape == (64, rank)
        assert mixed.get_submodule(site).lora_B["mix"].rank == rank
        if method == "cat":
            want = 0.7 * s1 * b1 @ a1 - 0.3 * s2 * b2 @ a2
            assert torch.allclose(b_new @ a_new, want, atol=1e-6)
    # the combined adapter computes what its factors say, merged or not
    y = run_model(mixed, spec)
    merged = run_model(apply_passes(mixed, [MergeLoRAPass(names=["mix"])]), spec)
    assert (merged - y).abs().max() <= 1e-5 * (1 + y.abs().max())
    assert audit(mixed).adapters[-1].ranks == tuple(
        factors(mixed, s, "mix")[0].shape[0] for s in
        ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj",
         "layers.1.attn.v_proj"])


def test_linear_with_ranks_unequal_at_one_site_names_it(per_layer, snapshot) -> None:
    before = snapshot(per_layer)
    with pytest.raises(ConfigError, match=r"method='linear' needs equal ranks, got \[2, 4\].* "
                                          r"\(at layers\.0\.attn\.q_proj; sources \['a', 'c'\]\)"):
        combine_adapters(per_layer, {"a": 0.5, "c": 0.5}, method="linear")
    before.assert_unchanged(per_layer)


@pytest.mark.filterwarnings("ignore:Adapter name")  # PEFT warns about short adapter names
@pytest.mark.parametrize("method", ["linear", "cat"])
def test_per_layer_ranks_equal_peft_add_weighted_adapter(zoo, per_layer, run_model,
                                                         method: str) -> None:
    peft = pytest.importorskip("peft")
    spec = zoo.spec("builtin:tiny")
    model = peft.get_peft_model(
        zoo.fresh("builtin:tiny").model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 4}),
        adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": 8},
                                           alpha_pattern={"v_proj": 16}))
    with torch.no_grad():
        for site in SITES:
            layer = model.base_model.model.get_submodule(site)
            for name in "ab":
                a, b, s = factors(per_layer, site, name)
                assert s == layer.scaling[name]
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.3], "ab", combination_type=method)
    model.set_adapter("ab")
    mixed = combine_adapters(per_layer, {"a": 0.7, "b": -0.3}, method=method, name="ab")
    for site in SITES:
        layer = model.base_model.model.get_submodule(site)
        a_new, b_new, _ = factors(mixed, site, "ab")
        theirs_a, theirs_b = layer.lora_A["ab"].weight, layer.lora_B["ab"].weight
        if method == "linear":  # the same factors, site by site
            assert torch.equal(a_new, theirs_a) and torch.equal(b_new, theirs_b)
        else:  # PEFT pads every site to the largest rank sum (16) with zeros
            r = a_new.shape[0]
            assert torch.equal(a_new, theirs_a[:r]) and torch.equal(b_new, theirs_b[:, :r])
            assert not theirs_a[r:].any() and not theirs_b[:, r:].any()
    y = run_model(mixed, spec)
    want = run_model(model, spec)
    assert (y - want).abs().max() <= 1e-6 * (1 + want.abs().max())

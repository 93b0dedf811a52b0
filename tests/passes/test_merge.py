"""LoRA merge and unmerge, IA³ fold and unfold (``passes/merge.py``) on site graphs.

Every model of the foundation table (TinyTransformer; GPT-2 with transposed ``Conv1D``
weights, LLaMA with non-square grouped-query projections and BERT, all transformers models)
is adapted, as the user's own model, with LoRA on every projection and with IA³ (keys,
values, feed-forward down projections, so output and input scaling), with random adapter
values. Expected weights are written out below from the formulas, independently of
``surgery.adapters.merge_math``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import Shared, randomize_adapters
from torch import fx, nn

from passes.merge import (
    MERGED_KEY,
    MergeIA3Pass,
    MergeLoRAPass,
    UnmergeIA3Pass,
    UnmergeLoRAPass,
    merged_adapters,
)
from surgery import (
    AdapterModule,
    AdapterNotFoundError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    Pass,
    PassResult,
    apply_passes,
    audit,
    set_active,
    trainable_parameters,
)
from surgery.sites.params import adapter_parameters
from surgery.sites.rewrite import (
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
)
from surgery.sites.site_graph import SiteGraph, base_module, site_graph_at, site_graphs

TABLE = ["builtin:tiny", "hf:gpt2", "hf:llama", "hf:bert"]
PROJECTIONS = {  # every projection of each model, by name (no map needed)
    "builtin:tiny": "re:.*_proj",
    "hf:gpt2": ["c_attn", "c_proj", "c_fc"],
    "hf:llama": "re:.*_proj",
    "hf:bert": ["query", "key", "value", "dense"],
}
MERGE_ALL = [MergeLoRAPass(), MergeIA3Pass()]  # IA³ scales the layer as LoRA adapted it
UNMERGE_ALL = [UnmergeIA3Pass(), UnmergeLoRAPass()]


def is_conv1d(module: nn.Module) -> bool:
    return type(base_module(module)).__name__ == "Conv1D"


def expected_weights(site: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W' = dtype(fp32(W) + fp32(s·B A))`` (transposed for Conv1D), then IA³ as
    ``dtype(fp32(W) · l)`` over rows/columns (and ``dtype(fp32(b) · l)``), one cast each."""
    weight, bias = site.weight.detach(), site.bias
    bias = None if bias is None else bias.detach()
    dtype = weight.dtype
    for name, lora_b in getattr(site, "lora_B", {}).items():
        lora_a = site.lora_A[name]
        delta = lora_b.scaling * (lora_b.weight.float() @ lora_a.weight.float())
        weight = (weight.float() + (delta.T if is_conv1d(site) else delta)).to(dtype)
    for vec in getattr(site, "ia3", {}).values():
        scale = vec.vector(vec.parameter(site)).detach().float()
        rows = (vec.mode == "output") != is_conv1d(site)  # Conv1D stores (in, out)
        weight = (weight.float() * (scale[:, None] if rows else scale[None, :])).to(dtype)
        if vec.mode == "output" and bias is not None:
            bias = (bias.float() * scale).to(bias.dtype)
    return weight, bias


def adapted_sites(model: nn.Module) -> dict[str, SiteGraph]:
    return {q: sg for q, sg in site_graphs(model)
            if any(isinstance(m, AdapterModule) for m in sg.modules())}


def surgery_nodes(model: nn.Module) -> list[str]:
    return [n.name for _, sg in site_graphs(model) for n in sg.graph.nodes if "surgery" in n.meta]


def graph_texts(model: nn.Module) -> dict[str, str]:
    return {q: str(sg.graph) for q, sg in site_graphs(model)}


def base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    adapters = {id(p) for _, p in adapter_parameters(model)}
    return {n: p for n, p in model.named_parameters() if id(p) not in adapters}


def records(model: nn.Module, site: str) -> tuple:
    return model.get_submodule(site).base_node.meta.get(MERGED_KEY, ())


def roundtrip(model: nn.Module, via: str) -> nn.Module:
    """``model`` through ``copy.deepcopy``, ``pickle`` or ``torch.save``/``torch.load``."""
    if via == "deepcopy":
        return copy.deepcopy(model)
    if via == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def adapt(spec, passes: list[Pass]) -> nn.Module:
    return apply_passes(spec.model, passes, spec.example_inputs, spec.example_kwargs or None)


@pytest.fixture(scope="module")
def adapted(zoo):
    """``adapted(name)``: the zoo model with LoRA on every projection and IA³, randomised.
    Shared by the tests of this module: adapt further only through copies."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            model = adapt(zoo.spec(name), [LoRAPass(pattern=PROJECTIONS[name], rank=4, alpha=8),
                                           IA3Pass()])
            randomize_adapters(model)
            cache[name] = model
        return cache[name]

    return get


@pytest.mark.parametrize("name", TABLE)
def test_merge_matches_formula_and_outputs_and_unmerge_restores_bitwise(zoo, adapted, run_model,
                                                                        snapshot, name: str) -> None:
    spec, model = zoo.spec(name), adapted(name)
    caller, given = snapshot(spec.model), snapshot(model)
    y = run_model(model, spec)
    merged = apply_passes(model, MERGE_ALL)

    given.assert_unchanged(model)  # the adapted model handed to the merge
    caller.assert_unchanged(spec.model)  # and the user's original model
    assert surgery_nodes(merged) == []
    sites = adapted_sites(model)
    assert set(merged_adapters(merged)) == set(sites)
    shapes = set()
    for qname, site in sites.items():
        weight, bias = expected_weights(site)
        new = merged.get_submodule(qname)
        assert torch.equal(new.weight, weight), qname
        assert new.weight.data_ptr() != site.weight.data_ptr()  # a new tensor
        if bias is not None:
            assert torch.equal(new.bias, bias), qname
        shapes.add(tuple(site.weight.shape))
    assert any(a != b for a, b in shapes), "the table must include non-square layers"
    y_merged = run_model(merged, spec)
    assert (y_merged - y).abs().max() <= 1e-5 * (1 + y.abs().max())

    restored = apply_passes(merged, UNMERGE_ALL)
    assert graph_texts(restored) == graph_texts(model)
    before, after = base_params(model), base_params(restored)
    assert list(after) == list(before)
    for pname, param in before.items():
        assert torch.equal(after[pname], param), pname
        assert after[pname].data_ptr() == param.data_ptr(), pname  # the same storage
        assert after[pname] is not param  # but the copy's own Parameter
    assert merged_adapters(restored) == {}
    assert torch.equal(run_model(restored, spec), y)

    # a pickled copy of the merged model is still merged, and unmerges exactly
    copied = pickle.loads(pickle.dumps(merged))
    assert merged_adapters(copied) == merged_adapters(merged)
    assert torch.equal(run_model(copied, spec), y_merged)
    again = apply_passes(copied, UNMERGE_ALL)
    assert graph_texts(again) == graph_texts(model)
    assert all(torch.equal(p, before[n]) for n, p in base_params(again).items())
    assert torch.equal(run_model(again, spec), y)


@pytest.mark.parametrize("name", TABLE)
def test_bf16_merge_is_one_cast_of_the_fp32_sum_and_unmerge_is_exact(adapted, name: str) -> None:
    model = apply_passes(adapted(name), []).to(torch.bfloat16)
    expected = {q: expected_weights(site) for q, site in adapted_sites(model).items()}
    originals = {n: p.detach().clone() for n, p in base_params(model).items()}
    apply_passes(model, MERGE_ALL, inplace=True)
    for qname, (weight, bias) in expected.items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(model.get_submodule(qname).weight, weight), qname
        if bias is not None:
            assert torch.equal(model.get_submodule(qname).bias, bias), qname
    apply_passes(model, UNMERGE_ALL, inplace=True)
    for pname, param in base_params(model).items():
        assert torch.equal(param, originals[pname]), pname


class _Mixed(nn.Module):
    """A non-square ``nn.Linear`` (16 → 24) feeding a non-square transformers ``Conv1D``
    (24 → 8, weight stored (24, 8))."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = nn.Linear(16, 24)
        self.proj = Conv1D(8, 24)
        nn.init.normal_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("ia3_mode", ["output", "input"])
def test_non_square_and_transposed_layers(ia3_mode: str) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    plain = _Mixed()
    ia3 = IA3Pass(pattern=["fc", "proj"], feedforward="proj" if ia3_mode == "input" else None)
    model = apply_passes(plain, [LoRAPass(pattern=["fc", "proj"], rank=3, alpha=6), ia3])
    randomize_adapters(model, seed=1)
    assert tuple(model.proj.weight.shape) == (24, 8)
    x = torch.randn(5, 16)
    y = model(x)
    merged = apply_passes(model, MERGE_ALL)
    for qname in ("fc", "proj"):
        weight, bias = expected_weights(model.get_submodule(qname))
        assert torch.equal(merged.get_submodule(qname).weight, weight)
        assert torch.equal(merged.get_submodule(qname).bias, bias)
    assert (merged(x) - y).abs().max() <= 1e-5 * (1 + y.abs().max())
    restored = apply_passes(merged, UNMERGE_ALL)
    assert torch.equal(restored(x), y)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-tensor", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cycles_with_training_restore_base_weights_exactly(zoo, run_model, dtype: torch.dtype,
                                                           inplace: bool) -> None:
    spec = zoo.fresh("builtin:tiny")
    caller = spec.model.to(dtype)
    originals = {n: p.detach().clone() for n, p in caller.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in caller.named_parameters()}
    model = apply_passes(caller, [LoRAPass(role=["query", "value", "ffn_down"], rank=4),
                                  IA3Pass()])
    q_name = "layers.0.attn.q_proj.weight"
    for cycle in range(3):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        run_model(model, spec).float().pow(2).mean().backward()
        opt.step()  # the adapters move between cycles
        last = cycle == 2
        y = run_model(model, spec) if last else None
        if inplace:  # an in-place pass runs alone, on the adapted model itself
            merged = apply_passes(model, [MergeLoRAPass(inplace=True)], inplace=True)
            apply_passes(merged, [MergeIA3Pass(inplace=True)], inplace=True)
        else:
            merged = apply_passes(model, MERGE_ALL)
        q = merged.get_submodule("layers.0.attn.q_proj").weight
        # in place: written into the storage shared with the caller, an exact copy kept
        assert (q.data_ptr() == ptrs[q_name]) == inplace
        assert torch.equal(caller.get_parameter(q_name), originals[q_name]) != inplace
        if last:
            tol = (1e-5 if dtype == torch.float32 else 5e-2) * (1 + y.abs().max())
            assert (run_model(merged, spec) - y).abs().max() <= tol
        if inplace:
            apply_passes(merged, [UnmergeIA3Pass(inplace=True)], inplace=True)
            model = apply_passes(merged, [UnmergeLoRAPass(inplace=True)], inplace=True)
        else:
            model = apply_passes(merged, UNMERGE_ALL)
        for n, p in base_params(model).items():
            assert torch.equal(p, originals[n]), (cycle, n)
        for n, p in caller.named_parameters():
            assert torch.equal(p, originals[n]) and p.data_ptr() == ptrs[n], (cycle, n)
        if last:
            assert torch.equal(run_model(model, spec), y)


@pytest.mark.parametrize(("via", "inplace", "dtype"), [
    ("deepcopy", False, torch.float32), ("deepcopy", True, torch.bfloat16),
    ("pickle", True, torch.float32), ("pickle", False, torch.bfloat16),
    ("torch.save", False, torch.float32), ("torch.save", True, torch.bfloat16)])
def test_a_copied_merged_model_is_still_merged_and_unmerges_exactly(
        zoo, run_model, via: str, inplace: bool, dtype: torch.dtype) -> None:
    spec = zoo.spec("builtin:tiny")
    model = apply_passes(spec.model, [
        LoRAPass(pattern=["q_proj", "v_proj", "down_proj"], rank=4),
        IA3Pass(pattern=["k_proj", "v_proj", "down_proj"], feedforward="down_proj")]).to(dtype)
    randomize_adapters(model, seed=3)
    y = run_model(model, spec)
    before = {n: p.detach().clone() for n, p in base_params(model).items()}
    texts = graph_texts(model)
    if inplace:  # writes the storage shared with spec.model: do it on a private copy
        model = copy.deepcopy(model)
        merged = apply_passes(model, [MergeLoRAPass(inplace=True)], inplace=True)
        merged = apply_passes(merged, [MergeIA3Pass(inplace=True)], inplace=True)
    else:
        merged = apply_passes(model, MERGE_ALL)
    y_merged = run_model(merged, spec)

    copied = roundtrip(merged, via)
    assert merged_adapters(copied) == merged_adapters(merged) != {}
    assert [r.inplace for r in records(copied, "layers.0.mlp.down_proj")] == [inplace] * 2
    assert torch.equal(run_model(copied, spec), y_merged)
    if inplace:
        back = apply_passes(copied, [UnmergeIA3Pass(inplace=True)], inplace=True)
        back = apply_passes(back, [UnmergeLoRAPass(inplace=True)], inplace=True)
    else:
        back = apply_passes(copied, UNMERGE_ALL)
    assert merged_adapters(back) == {}
    assert graph_texts(back) == texts
    for name, param in base_params(back).items():
        assert torch.equal(param, before[name]), name
    assert torch.equal(run_model(back, spec), y)
    assert merged_adapters(merged) != {}  # the original merged model is left as it was
    assert torch.equal(run_model(merged, spec), y_merged)


def _set(model: nn.Module, slot: str, name: str, value: float) -> None:
    """Give adapter ``name``'s parameters in ``slot`` (``lora_B.<name>.weight``,
    ``ia3_l.<name>``) values far from init, ``value ± 0.3``."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for qname, param in model.named_parameters():
            if qname.endswith((f"{slot}.{name}.weight", f"{slot}.{name}")):
                param.copy_(value + 0.3 * torch.randn(param.shape, generator=gen))


def test_adapters_added_between_merge_and_unmerge_keep_what_the_model_computes(zoo,
                                                                            run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    tol = 1e-5
    # LoRA merged, then an IA³ output scaling: unmerged, the branch goes back inside it
    model = apply_passes(spec.model, [LoRAPass(pattern="v_proj", rank=2, name="a")])
    randomize_adapters(model)
    later = apply_passes(apply_passes(model, [MergeLoRAPass()]),
                         [IA3Pass(pattern="v_proj", name="v")])
    _set(later, "ia3_l", "v", 1.0)
    y = run_model(later, spec)
    back = apply_passes(later, [UnmergeLoRAPass()])
    assert (run_model(back, spec) - y).abs().max() <= tol * (1 + y.abs().max())
    sg = back.get_submodule("layers.0.attn.v_proj")
    assert [n.meta["surgery"]["part"] for n in sg.graph.nodes
            if "surgery" in n.meta and n.op != "get_attr"][-2:] == ["add", "ia3"]
    # IA³ input scaling merged, then LoRA 'b' reading the unscaled input: unmerged, the
    # layer reads the scaled input again and 'b' still reads what it read
    model = apply_passes(spec.model, [LoRAPass(pattern="down_proj", rank=2, name="a"),
                                      IA3Pass(pattern="down_proj", feedforward="down_proj",
                                              name="v")])
    randomize_adapters(model)
    later = apply_passes(apply_passes(model, MERGE_ALL),
                         [LoRAPass(pattern="down_proj", rank=2, name="b")])
    _set(later, "lora_B", "b", 0.0)
    y = run_model(later, spec)
    back = apply_passes(later, [UnmergeIA3Pass()])
    assert (run_model(back, spec) - y).abs().max() <= tol * (1 + y.abs().max())
    with pytest.raises(MergeError, match=r"cannot merge LoRA 'b' into layers\.0\.mlp\.down_proj: "
                                         r"the layer reads its input through IA³ 'v'"):
        apply_passes(back, [MergeLoRAPass(names="b")])
    back = apply_passes(back, [UnmergeLoRAPass(names="a")])
    assert (run_model(back, spec) - y).abs().max() <= tol * (1 + y.abs().max())


def test_a_layer_called_twice_is_one_site_and_merges_once() -> None:
    torch.manual_seed(0)
    model = apply_passes(Shared(), [LoRAPass(pattern="proj", rank=2), IA3Pass(pattern="proj")])
    randomize_adapters(model, seed=4)
    x = torch.randn(5, 8)
    y = model(x)
    expected, _ = expected_weights(model.proj)
    merged = apply_passes(model, MERGE_ALL)
    assert merged_adapters(merged) == {"proj": ("lora:default", "ia3:default")}
    assert torch.equal(merged.proj.weight, expected)
    assert (merged(x) - y).abs().max() <= 1e-5 * (1 + y.abs().max())
    back = apply_passes(merged, UNMERGE_ALL)
    assert torch.equal(back(x), y) and graph_texts(back) == graph_texts(model)


def test_a_model_that_is_one_layer_merges_at_its_root() -> None:
    torch.manual_seed(0)
    model = apply_passes(nn.Linear(8, 6), [LoRAPass(pattern="*", rank=2), IA3Pass(pattern="*")])
    randomize_adapters(model, seed=5)
    x = torch.randn(4, 8)
    y = model(x)
    expected = expected_weights(model)
    merged = apply_passes(model, MERGE_ALL)
    assert merged_adapters(merged) == {"": ("lora:default", "ia3:default")}
    assert torch.equal(merged.weight, expected[0]) and torch.equal(merged.bias, expected[1])
    assert surgery_nodes(merged) == []
    back = apply_passes(merged, UNMERGE_ALL)
    assert torch.equal(back(x), y) and torch.equal(back.weight, model.weight)


@pytest.mark.filterwarnings("ignore")  # PEFT's own warnings (fan_in_fan_out, ...)
@pytest.mark.parametrize(("name", "targets"), [("builtin:tiny", ["q_proj", "v_proj"]),
                                               ("hf:gpt2", ["c_attn", "c_fc"])])
def test_fp32_merge_and_unload_equal_peft_merge_and_unload(zoo, name: str,
                                                          targets: list[str]) -> None:
    peft = pytest.importorskip("peft")
    from surgery import unload

    spec = zoo.spec(name)
    ours = apply_passes(spec.model, [LoRAPass(pattern=targets, rank=4, alpha=8)])
    randomize_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                             fan_in_fan_out=name == "hf:gpt2")
    theirs = peft.get_peft_model(zoo.fresh(name).model, config)
    with torch.no_grad():
        for qname, sg in site_graphs(ours):
            layer = theirs.base_model.model.get_submodule(qname)
            layer.lora_A["default"].weight.copy_(sg.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(sg.lora_B["default"].weight)
    plain = theirs.merge_and_unload()
    merged, unloaded = apply_passes(ours, [MergeLoRAPass()]), unload(ours)
    for qname, _ in site_graphs(ours):
        want = plain.get_submodule(qname).weight
        assert torch.equal(merged.get_submodule(qname).weight, want), qname
        assert torch.equal(unloaded.get_submodule(qname).weight, want), qname


def test_inplace_merge_keeps_storage_and_records_a_copy(adapted) -> None:
    model = apply_passes(adapted("builtin:tiny"), [])
    q = model.get_submodule("layers.0.attn.q_proj")
    ptr, original = q.weight.data_ptr(), q.weight.detach().clone()
    expected, _ = expected_weights(q)
    apply_passes(model, [MergeLoRAPass(inplace=True)], inplace=True)
    assert q.weight.data_ptr() == ptr and torch.equal(q.weight, expected)
    assert model.get_submodule("layers.0.attn.q_proj") is q  # the same site graph, rewritten
    (record,) = records(model, "layers.0.attn.q_proj")
    assert record.inplace and torch.equal(record.weight, original)
    assert record.weight.data_ptr() != ptr  # the exact copy that unmerge writes back
    apply_passes(model, [UnmergeLoRAPass(inplace=True)], inplace=True)
    assert q.weight.data_ptr() == ptr and torch.equal(q.weight, original)


@pytest.mark.parametrize("cls", [MergeLoRAPass, MergeIA3Pass, UnmergeLoRAPass, UnmergeIA3Pass])
def test_writes_in_place_is_the_inplace_setting(cls: type) -> None:
    assert cls().writes_in_place is False
    assert cls(inplace=True).writes_in_place is True


def test_unmerging_an_inplace_merge_needs_inplace(adapted, snapshot) -> None:
    model = apply_passes(adapted("builtin:tiny"), [])
    original = model.get_submodule("layers.0.attn.q_proj").weight.detach().clone()
    apply_passes(model, [MergeLoRAPass(inplace=True)], inplace=True)
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"LoRA 'default' was merged into layers\.\d\.\S+ in "
                                         r"place .*apply_passes\(model, \[UnmergeLoRAPass\("
                                         r"inplace=True\)\], inplace=True\)"):
        apply_passes(model, [UnmergeLoRAPass()])  # would write the storage `model` computes with
    before.assert_unchanged(model)
    apply_passes(model, [UnmergeLoRAPass(inplace=True)], inplace=True)
    assert torch.equal(model.get_submodule("layers.0.attn.q_proj").weight, original)


def test_plan_of_an_inplace_merge_writes_nothing(adapted, snapshot) -> None:
    model = adapted("builtin:tiny")
    before = snapshot(model)
    changes = MergeLoRAPass(inplace=True).plan(model)
    before.assert_unchanged(model)
    rewritten = [c for c in changes if c.kind == "param_rewritten"]
    assert len(rewritten) == 12 and all(c.detail.endswith("(in place)") for c in rewritten)


def test_switched_off_adapters_are_left_out(zoo) -> None:
    model = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(rank=2, name="a"),
                                                          LoRAPass(rank=2, name="b")])
    set_active(model, "b")  # a adds nothing now; merging it would add its update
    merged = apply_passes(model, [MergeLoRAPass()])
    assert set(merged_adapters(merged).values()) == {("lora:b",)}
    with pytest.raises(MergeError, match=r"LoRA adapter 'a' is switched off .*set_active"):
        apply_passes(model, [MergeLoRAPass(names=["a"])])
    set_active(model, [])
    with pytest.raises(MergeError, match="nothing to merge: every LoRA adapter is switched off"):
        apply_passes(model, [MergeLoRAPass()])


def test_merge_freezes_merged_adapters_and_unmerge_gives_their_flags_back(zoo) -> None:
    model = apply_passes(zoo.spec("builtin:tiny").model, [
        LoRAPass(role="query", rank=2, name="a"), LoRAPass(role="query", rank=2, name="b"),
        IA3Pass(name="v")])
    model.get_submodule("layers.0.attn.q_proj.lora_B.a").weight.requires_grad_(False)  # by hand
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    merged_names = {n for n in flags if ".lora_A.a." in n or ".lora_B.a." in n
                    or n.endswith(".ia3_l.v")}
    assert len(merged_names) == 2 * 2 + 6 and flags["layers.1.attn.q_proj.lora_B.a.weight"]

    merged = apply_passes(model, [MergeLoRAPass(names="a"), MergeIA3Pass()])
    after = {n: p.requires_grad for n, p in merged.named_parameters()}
    assert after == {n: flag and n not in merged_names for n, flag in flags.items()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, flag in flags.items() if flag}  # the model given is left alone
    trainable = {id(p) for p in trainable_parameters(merged)}
    b_params = [p for n, p in merged.named_parameters() if ".lora_A.b." in n or ".lora_B.b." in n]
    assert trainable == {id(p) for p in b_params}
    assert audit(merged).totals.trainable == sum(p.numel() for p in b_params)
    frozen = [c.name for r in merged._surgery.history[-2:] for c in r.changes
              if c.kind == "param_frozen" and c.pass_name in ("merge_lora", "merge_ia3")]
    assert sorted(frozen) == sorted(n for n in merged_names if flags[n])
    (record,) = records(merged, "layers.0.attn.q_proj")[:1]
    assert dict(record.adapter_grads) == {"lora_A.a.weight": True, "lora_B.a.weight": False}

    back = apply_passes(merged, [UnmergeIA3Pass(), UnmergeLoRAPass()])
    assert {n: p.requires_grad for n, p in back.named_parameters()} == flags


def test_train_and_eval_never_merge_or_unmerge(adapted) -> None:
    merged = apply_passes(adapted("builtin:tiny"), [MergeLoRAPass()])
    graphs = graph_texts(merged)
    weights = {n: p.detach().clone() for n, p in merged.named_parameters()}
    for mode in (True, False, True):
        merged.train(mode)
        assert graph_texts(merged) == graphs
        assert all(torch.equal(p, weights[n]) for n, p in merged.named_parameters())
        assert set(merged_adapters(merged)) == {f"layers.{i}.{s}" for i in range(2) for s in
                                                ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                 "attn.o_proj", "mlp.up_proj", "mlp.down_proj")}


def test_pass_result_records_removed_nodes_and_rewritten_weights(adapted) -> None:
    model = adapted("builtin:tiny")
    merged = apply_passes(model, [MergeLoRAPass()])
    result: PassResult = merged._surgery.history[-1]
    assert result.pass_name == "merge_lora" and result.modified
    removed = [c for c in result.changes if c.kind == "node_removed"]
    rewritten = [c.name for c in result.changes if c.kind == "param_rewritten"]
    assert len(removed) == 5 * 12  # five nodes per branch, twelve LoRA layers
    assert sorted(rewritten) == sorted(f"{q}.weight" for q in merged_adapters(merged))
    restored = apply_passes(merged, [UnmergeLoRAPass()])
    added = [c for c in restored._surgery.history[-1].changes if c.kind == "node_added"]
    assert sorted(c.name for c in added) == sorted(c.name for c in removed)


def test_names_select_adapters_and_unmerge_is_last_in_first_out(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    model = apply_passes(spec.model, [LoRAPass(rank=4, name="a"), LoRAPass(rank=2, name="b")])
    randomize_adapters(model, seed=2)
    only_a = apply_passes(model, [MergeLoRAPass(names=["a"])])
    assert merged_adapters(only_a)["layers.0.attn.q_proj"] == ("lora:a",)
    assert {n.meta["surgery"]["adapter"] for _, sg in site_graphs(only_a) for n in sg.graph.nodes
            if "surgery" in n.meta} == {"b"}
    both = apply_passes(only_a, [MergeLoRAPass()])  # None: the ones not merged yet
    assert merged_adapters(both)["layers.0.attn.q_proj"] == ("lora:a", "lora:b")
    with pytest.raises(MergeError, match=r"cannot unmerge LoRA 'a' .* 'b', merged after it"):
        apply_passes(both, [UnmergeLoRAPass(names="a")])
    back = apply_passes(both, [UnmergeLoRAPass(names="b"), UnmergeLoRAPass(names="a")])
    assert graph_texts(back) == graph_texts(model)
    assert torch.equal(run_model(back, spec), run_model(model, spec))


# --------------------------------------------------------------------------------------
# Errors: nothing changes when they are raised
# --------------------------------------------------------------------------------------


class FakeAdapter(AdapterModule):
    """A module that is neither LoRA nor IA³ (stands in for a bottleneck adapter)."""

    pass_name = "adapter"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class FakeAdapterPass(Pass):
    """Adds ``FakeAdapter`` ``"fake"`` right after the layer ``layers.0.mlp.up_proj``."""

    name = "adapter"

    def run(self, model: nn.Module) -> PassResult:
        site = "layers.0.mlp.up_proj"
        root, sg = site_graph_at(model, site, who="FakeAdapterPass")
        register_adapter(sg, "adapter", "fake", FakeAdapter(site=site, adapter_name="fake"),
                         pass_name="Fake", site=site)
        graph: fx.Graph = sg.graph
        base = sg.base_node
        out = insert_after(graph, base, lambda: mark(
            graph.call_module("adapter.fake", (base,)), pass_name="adapter", site=site,
            role=None, adapter="fake", part="adapter"))
        replace_uses_after(base, out)
        return PassResult(root, True, (), self.name)


@pytest.fixture(scope="module")
def lora_and_fake(zoo) -> nn.Module:
    model = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(rank=4), FakeAdapterPass()])
    randomize_adapters(model)
    return model


def test_double_merge_raises(adapted, snapshot) -> None:
    merged = apply_passes(adapted("builtin:tiny"), [MergeLoRAPass()])
    before = snapshot(merged)
    with pytest.raises(MergeError, match="every LoRA adapter is already merged"):
        apply_passes(merged, [MergeLoRAPass()], inplace=True)
    with pytest.raises(MergeError, match="'default' is already merged .* twice"):
        apply_passes(merged, [MergeLoRAPass(names=["default"])], inplace=True)
    before.assert_unchanged(merged)


def test_unmerge_without_merge_raises(adapted, snapshot) -> None:
    model = apply_passes(adapted("builtin:tiny"), [])
    before = snapshot(model)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        apply_passes(model, [UnmergeLoRAPass()], inplace=True)
    with pytest.raises(MergeError, match="nothing to unmerge: IA³ adapter 'default' is"):
        apply_passes(model, [UnmergeIA3Pass(names=["default"])], inplace=True)
    before.assert_unchanged(model)


def test_merge_without_lora_raises(zoo) -> None:
    with pytest.raises(MergeError, match="nothing to merge: the model has no LoRA adapter"):
        apply_passes(zoo.spec("builtin:tiny").model, [MergeLoRAPass()])
    only_ia3 = apply_passes(zoo.spec("builtin:tiny").model, [IA3Pass()])
    with pytest.raises(MergeError, match="'default' is an IA³ adapter.*MergeIA3Pass"):
        apply_passes(only_ia3, [MergeLoRAPass(names=["default"])])


def test_unknown_name_lists_adapters_present(lora_and_fake) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'nope'; adapters present: "
                                                   r"'default' \(LoRA\), 'fake' \(adapter\)"):
        apply_passes(lora_and_fake, [MergeLoRAPass(names=["nope"])])
    with pytest.raises(ConfigError, match="names must be"):
        MergeLoRAPass(names=[3])


def test_non_mergeable_adapter_raises_and_says_why(lora_and_fake, snapshot) -> None:
    before = snapshot(lora_and_fake)
    with pytest.raises(MergeError, match=r"'fake' \(adapter\) cannot be merged: .*not linear"):
        apply_passes(lora_and_fake, [MergeLoRAPass(names=["fake"])], inplace=True)
    with pytest.raises(MergeError, match=r"'fake' \(adapter\) cannot be merged"):
        apply_passes(lora_and_fake, [MergeIA3Pass(names=["fake"])], inplace=True)
    before.assert_unchanged(lora_and_fake)
    merged = apply_passes(lora_and_fake, [MergeLoRAPass()])  # the LoRA part merges fine
    assert surgery_nodes(merged) == ["adapter_fake"]


def test_order_that_cannot_fold_raises_and_names_what_to_merge_first(adapted, snapshot) -> None:
    model = adapted("builtin:tiny")
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"cannot merge IA³ 'default' into layers\.\d\.\S+: LoRA "
                                         r"'default' .*merge LoRA 'default' first"):
        apply_passes(model, [MergeIA3Pass(), MergeLoRAPass()])
    before.assert_unchanged(model)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-tensor", "inplace"])
def test_non_finite_merge_raises_and_changes_nothing(adapted, snapshot, inplace: bool) -> None:
    model = apply_passes(adapted("builtin:tiny"), [])
    with torch.no_grad():
        model.get_submodule("layers.1.mlp.down_proj.lora_B.default").weight[3, 1] = float("inf")
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"merging LoRA 'default' into layers\.1\.mlp\.down_proj "
                                         r"gives non-finite values.*nothing was changed"):
        apply_passes(model, [MergeLoRAPass(inplace=inplace)], inplace=True)
    before.assert_unchanged(model)
    unsafe = apply_passes(model, [MergeLoRAPass(safe=False)])
    assert not torch.isfinite(unsafe.get_submodule("layers.1.mlp.down_proj").weight).all()



def test_merge_is_rolled_back_with_a_later_failing_pass(adapted, snapshot) -> None:
    model = apply_passes(adapted("builtin:tiny"), [])
    before = snapshot(model)
    with pytest.raises(MergeError, match="already merged"):
        apply_passes(model, [MergeLoRAPass(), MergeLoRAPass()], inplace=True)
    before.assert_unchanged(model)
    assert merged_adapters(model) == {}  # the merge state went back with the graph
    apply_passes(model, [MergeLoRAPass()], inplace=True)
    assert len(merged_adapters(model)) == 12


def test_param_diff_shows_merged_weights_as_rewritten(adapted) -> None:
    from visualize import param_diff

    model = adapted("builtin:tiny")
    merged = apply_passes(model, [MergeLoRAPass()])
    rows = [r for r in param_diff(model, merged) if r.kind == "rewritten"]
    assert sorted(r.name for r in rows) == sorted(f"{q}.weight" for q in merged_adapters(merged))
    assert {r.pass_name for r in rows} == {"merge_lora"}


def test_lora_behind_a_non_mergeable_adapter_stays_unmerged(zoo, snapshot) -> None:
    model = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern="layers.0.mlp.up_proj"),
                                                          FakeAdapterPass()])
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"cannot merge LoRA 'default' into layers\.0\.mlp\.up_proj: "
                                         r"adapter 'fake' sits between.*'fake' cannot be merged"):
        apply_passes(model, [MergeLoRAPass()], inplace=True)
    before.assert_unchanged(model)


class ScaledLinear(nn.Linear):
    """A linear layer whose own forward does more than ``x W^T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class MatmulLinear(nn.Linear):
    """A linear layer whose own forward writes the product out (Falcon's FalconLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_linear_subclass_computing_the_product_its_own_way_merges() -> None:
    from surgery import unload

    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    adapted = apply_passes(model, [LoRAPass(pattern="*", rank=2)])
    for p in trainable_parameters(adapted):
        torch.nn.init.normal_(p)
    x = torch.randn(3, 6)
    want = adapted(x)
    merged = apply_passes(adapted, [MergeLoRAPass()])
    assert not torch.equal(merged[0].weight, model[0].weight)  # folded into the weight
    assert torch.allclose(merged(x), want, rtol=1e-5, atol=1e-5)
    unmerged = apply_passes(merged, [UnmergeLoRAPass()])
    assert torch.equal(unmerged[0].weight, model[0].weight)  # bit for bit
    assert torch.equal(unmerged(x), want)
    plain = unload(adapted)
    assert type(plain[0]) is MatmulLinear
    assert torch.allclose(plain(x), want, rtol=1e-5, atol=1e-5)


def test_a_layer_whose_forward_is_not_its_weights_product_refuses_to_merge(snapshot) -> None:
    from surgery import unload

    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    adapted = apply_passes(model, [LoRAPass(pattern="*", rank=2)])
    for p in trainable_parameters(adapted):
        torch.nn.init.normal_(p)
    x = torch.randn(3, 6)
    want = adapted(x)
    before = snapshot(adapted)
    with pytest.raises(MergeError, match=r"MergeLoRAPass: 0 \(ScaledLinear\) cannot take an adapter "
                                         r"into its weight: its forward \(ScaledLinear.forward\)"):
        apply_passes(adapted, [MergeLoRAPass()])
    with pytest.raises(MergeError, match=r"unload: 0 \(ScaledLinear\) cannot take an adapter"):
        unload(adapted)
    before.assert_unchanged(adapted)
    assert torch.equal(adapted(x), want)

"""Tests of surgery/audit: totals, rows, provenance, formats, copies, and agreement with PEFT."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import astuple, fields
from typing import Any

import pytest
import torch
from torch import nn

from surgery import IA3Pass, LoRAPass, apply_passes, list_targets, trainable_parameters
from surgery.adapters.active import set_active, set_trainable
from surgery.audit.count import Audit, audit, format_totals
from surgery.sites.site_graph import SiteGraph
from surgery.zoo import load_model

HAS_PEFT = all(importlib.util.find_spec(m) is not None for m in ("peft", "transformers"))
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="needs peft and transformers")

# The built-in model: 141,312 parameters. LoRA r=8 on the 8 attention projections
# (64 -> 64): 8 * (8*64 + 64*8) = 8,192; IA3 on 2 x (key 64 + value 64 + ffn_down input 256) = 768.
BUILTIN_TOTAL = 141_312
BUILTIN_TRAINABLE = 8_192 + 768


def _owners(model: nn.Module) -> list[str]:
    """Module names owning parameters directly, in module order."""
    return [n for n, m in model.named_modules(remove_duplicate=False)
            if next(m.parameters(recurse=False), None) is not None]


@pytest.fixture(scope="module")
def builtin_adapted() -> nn.Module:
    spec = load_model("builtin")
    return apply_passes(spec.model, [LoRAPass(pattern="attn.*", rank=8, alpha=16), IA3Pass()])


@pytest.fixture(scope="module")
def builtin_audit(builtin_adapted: nn.Module) -> Audit:
    return audit(builtin_adapted)


# ---------------------------------------------------------------------------------------
# totals line


def test_format_totals_matches_peft_format() -> None:
    assert format_totals(1234, 56789) == (
        "trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730")
    assert format_totals(0, 0) == "trainable params: 0 || all params: 0 || trainable%: 0.0000"


def test_totals_of_adapted_builtin(builtin_adapted: nn.Module, builtin_audit: Audit) -> None:
    trainable, total, percent = builtin_audit.totals
    assert (trainable, total) == (BUILTIN_TRAINABLE, BUILTIN_TOTAL + BUILTIN_TRAINABLE)
    assert trainable == sum(p.numel() for p in trainable_parameters(builtin_adapted))
    assert percent == 100 * trainable / total
    assert str(builtin_audit).splitlines()[0] == (
        "trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625")


def test_rows_add_up_to_totals_in_module_order(builtin_adapted: nn.Module,
                                               builtin_audit: Audit) -> None:
    rows = builtin_audit.rows
    assert [r.name for r in rows] == _owners(builtin_adapted)
    assert sum(r.params for r in rows) == builtin_audit.totals.total
    assert sum(r.trainable_params for r in rows) == builtin_audit.totals.trainable


# ---------------------------------------------------------------------------------------
# rows and provenance


def test_site_and_adapter_rows(builtin_adapted: nn.Module, builtin_audit: Audit) -> None:
    rows = {r.name: r for r in builtin_audit.rows}
    assert isinstance(builtin_adapted.get_submodule("layers.0.attn.q_proj"), SiteGraph)
    q = rows["layers.0.attn.q_proj"]  # a site graph, listed as the layer it replaced
    assert (q.type, q.role, q.params, q.trainable_params, q.trainable) == (
        "Linear", "query", 4160, 0, "no")
    assert (q.dtype, q.device, q.frozen_by, q.added_by) == ("float32", "cpu", ("lora",), ())
    assert q.adapters == ("lora:default",)
    a = rows["layers.0.attn.q_proj.lora_A.default"]
    assert (a.type, a.role, a.params, a.trainable, a.added_by) == (
        "LoRAProjection", "query", 512, "yes", ("lora:default",))
    v = rows["layers.1.attn.v_proj"]
    assert v.adapters == ("lora:default", "ia3:default")
    down = rows["layers.0.mlp.down_proj"]
    assert (down.role, down.frozen_by, down.adapters) == ("ffn_down", ("ia3",), ("ia3:default",))
    ia3 = rows["layers.0.mlp.down_proj.ia3_l"]  # the slot holding ia3_l.<adapter>
    assert (ia3.type, ia3.role, ia3.params, ia3.trainable, ia3.added_by) == (
        "AdapterParameters", "ffn_down", 256, "yes", ("ia3:default",))
    embed = rows["embed"]
    assert (embed.role, embed.frozen_by, embed.trainable) == ("", ("freeze",), "no")
    assert "frozen (base)" in embed.provenance
    assert "layers.0.attn.q_proj.lora_dropout.default" not in rows  # owns no parameters


def test_adapter_summaries(builtin_audit: Audit) -> None:
    by_key = {a.key: a for a in builtin_audit.adapters}
    assert list(by_key) == ["lora:default", "ia3:default"]
    lora, ia3 = by_key["lora:default"], by_key["ia3:default"]
    assert (lora.params, lora.trainable, len(lora.sites)) == (8_192, "yes", 8)
    assert lora.sites[:4] == tuple(f"layers.0.attn.{p}_proj" for p in "qkvo")
    assert (ia3.params, ia3.trainable) == (768, "yes")
    assert ia3.sites == ("layers.0.attn.k_proj", "layers.0.attn.v_proj", "layers.0.mlp.down_proj",
                         "layers.1.attn.k_proj", "layers.1.attn.v_proj", "layers.1.mlp.down_proj")


def test_several_named_adapters_and_partial() -> None:
    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=2, name="a"),
                                        LoRAPass(pattern="q_proj", rank=4, name="b")])
    adapted.get_submodule("layers.0.attn.q_proj.lora_A.b").weight.requires_grad_(False)
    result = audit(adapted)
    by_key = {a.key: a for a in result.adapters}
    assert (by_key["lora:a"].params, by_key["lora:a"].trainable) == (2 * 2 * 128, "yes")
    b = by_key["lora:b"]
    assert (b.params, b.trainable_params, b.trainable) == (
        2 * 4 * 128, 2 * 4 * 128 - 4 * 64, "partial")
    assert b.sites == ("layers.0.attn.q_proj", "layers.1.attn.q_proj")
    rows = {r.name: r for r in result.rows}
    assert rows["layers.0.attn.q_proj"].adapters == ("lora:a", "lora:b")
    assert result.totals.trainable == 2 * 2 * 128 + 2 * 4 * 128 - 4 * 64


def test_stack_lists_each_adapter_active_and_trainable() -> None:
    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=2, name="sst2"),
                                        LoRAPass(pattern="q_proj", rank=2, name="mnli"),
                                        IA3Pass(name="mnli")])
    set_active(adapted, "sst2")  # mnli (LoRA and IA3) off, still training
    set_trainable(adapted, "mnli")  # sst2 on, frozen
    result = audit(adapted)
    got = {a.key: (a.name, a.pass_name, len(a.sites), a.params, a.trainable, a.active)
           for a in result.adapters}
    assert got == {"lora:sst2": ("sst2", "lora", 2, 512, "no", "yes"),
                   "lora:mnli": ("mnli", "lora", 2, 512, "yes", "no"),
                   "ia3:mnli": ("mnli", "ia3", 6, 768, "yes", "no")}
    lines = str(result).splitlines()
    assert "adapter lora:sst2: 2 site(s), 512 params, trainable: no, active: yes, rank 2" in lines
    assert "adapter ia3:mnli: 6 site(s), 768 params, trainable: yes, active: no" in lines
    md = result.to_markdown()
    assert "| mnli | lora | 2 | 512 | yes | no |" in md and "| sst2 | lora | 2 | 512 | no | yes |" in md
    data = json.loads(result.to_json())
    assert [(a["name"], a["pass_name"], a["active"], a["trainable"]) for a in data["adapters"]] == [
        ("sst2", "lora", "yes", "no"), ("mnli", "lora", "no", "yes"), ("mnli", "ia3", "no", "yes")]
    rows = {r.name: r for r in result.rows}
    b = rows["layers.0.attn.q_proj.lora_B.mnli"]
    assert (b.active, b.trainable, b.provenance) == ("no", "yes", "added by lora:mnli; inactive")
    assert rows["layers.0.attn.q_proj.lora_B.sst2"].active == "yes"
    assert rows["layers.0.attn.q_proj"].active == ""  # not an adapter module
    set_active(adapted, None)
    assert {a.active for a in audit(adapted).adapters} == {"yes"}


def test_plain_module_everything_as_flagged() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    result = audit(model)
    assert result.totals == (3 + 8, 15 + 8, 100 * 11 / 23)
    assert (result.frontend, result.passes, result.adapters, result.model) == (
        None, (), (), "Sequential")
    assert [(r.name, r.type, r.role, r.params, r.trainable_params, r.trainable)
            for r in result.rows] == [("0", "Linear", "", 15, 3, "partial"),
                                      ("2", "Linear", "", 8, 8, "yes")]
    assert all(r.provenance == "" for r in result.rows)
    assert model[0].weight.requires_grad is False  # the audit only reads


def test_tied_parameter_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    result = audit(Tied())
    assert result.totals[:2] == (40, 40) == (sum(p.numel() for p in Tied().parameters()),) * 2
    rows = {r.name: r for r in result.rows}
    assert (rows["embed"].params, rows["head"].params) == (40, 0)
    assert rows["head"].tied == ("weight=embed.weight",)


def test_mixed_dtypes_are_listed() -> None:
    model = nn.Linear(2, 2)
    model.bias = nn.Parameter(model.bias.detach().to(torch.bfloat16))
    assert audit(model).rows[0].dtype == "float32, bfloat16"


# ---------------------------------------------------------------------------------------
# options


def test_depth_collapses_subtrees(builtin_adapted: nn.Module, builtin_audit: Audit) -> None:
    result = audit(builtin_adapted, depth=2)
    assert [r.name for r in result.rows] == ["embed", "pos_embed", "layers.0", "layers.1", "ln_f",
                                             "lm_head"]
    block = result.rows[2]
    inside = sum(r.params for r in builtin_audit.rows if r.name.startswith("layers.0."))
    assert (block.type, block.trainable, block.params) == ("TinyBlock", "partial", inside)
    assert block.added_by == ("lora:default", "ia3:default")
    assert set(block.frozen_by) == {"freeze", "lora", "ia3"}
    assert sum(r.params for r in result.rows) == result.totals.total
    assert result.totals == builtin_audit.totals
    assert [r.name for r in audit(builtin_adapted, depth=0).rows] == [""]
    with pytest.raises(ValueError, match="depth"):
        audit(builtin_adapted, depth=-1)


def test_only_trainable(builtin_adapted: nn.Module, builtin_audit: Audit) -> None:
    result = audit(builtin_adapted, only_trainable=True)
    assert [r.name for r in result.rows] == [n.rpartition(".")[0] for n, p in
                                             builtin_adapted.named_parameters() if p.requires_grad]
    assert all(r.trainable == "yes" for r in result.rows)
    assert result.totals == builtin_audit.totals


# ---------------------------------------------------------------------------------------
# formats


def test_str_table(builtin_audit: Audit) -> None:
    lines = str(builtin_audit).splitlines()
    assert lines[1] == ("adapter lora:default: 8 site(s), 8,192 params, trainable: yes, "
                        "active: yes, rank 8")
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    assert lines[header].split() == ["name", "type", "role", "params", "trainable", "dtype",
                                     "device", "changed", "by"]
    body = lines[header + 2:]
    assert len(body) == len(builtin_audit.rows)
    assert body[4].split()[:5] == ["layers.0.attn.q_proj.lora_A.default", "LoRAProjection",
                                   "query", "512", "yes"]


def test_json_round_trip_and_stable_keys(builtin_audit: Audit) -> None:
    text = builtin_audit.to_json()
    data = json.loads(text)
    assert data == builtin_audit.to_dict()
    assert text == builtin_audit.to_json()
    assert sorted(data) == ["adapters", "frontend", "model", "notes", "passes", "rows", "totals"]
    assert data["totals"] == {"trainable": 8_960, "total": 150_272,
                              "percent": 100 * 8_960 / 150_272}
    assert (data["model"], data["passes"]) == ("TinyTransformer", ["lora", "ia3", "freeze"])
    assert sorted(data["rows"][0]) == ["active", "adapters", "added_by", "device", "dtype",
                                       "frozen_by", "name", "params", "rewritten_by", "role",
                                       "tied", "trainable", "trainable_params", "trained_by",
                                       "trained_params", "type"]
    assert sorted(data["adapters"][0]) == ["active", "name", "params", "pass_name", "ranks",
                                           "sites", "trainable", "trainable_params", "variant"]
    assert data["adapters"][0]["ranks"] == [8] * 8 and data["notes"] == []


def test_markdown(builtin_audit: Audit) -> None:
    md = builtin_audit.to_markdown()
    assert md.startswith(
        "**trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625**\n")
    assert "| default | lora | 8 | 8,192 | yes | yes | 8 |" in md
    assert ("| `layers.0.attn.q_proj.lora_A.default` | LoRAProjection | query | 512 | yes "
            "| float32 | cpu | added by lora:default |") in md


def test_rich_table(builtin_audit: Audit) -> None:
    from rich.console import Console
    from rich.table import Table

    table = builtin_audit.__rich__()
    assert isinstance(table, Table)
    assert table.row_count == len(builtin_audit.rows)
    console = Console(record=True, width=220, color_system=None)
    console.print(builtin_audit)
    text = console.export_text()
    assert "trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625" in text
    assert "layers.0.attn.q_proj.lora_A.default" in text


# ---------------------------------------------------------------------------------------
# agreement with PEFT on transformers models (their maps traced through torch.export)

# (spec, our selection, PEFT target_modules, expected trainable computed by hand)
LORA_CASES = [
    # c_attn 64 -> 192: A 8x64 + B 192x8 = 2,048 per layer
    pytest.param("hf:gpt2", dict(pattern="c_attn"), ["c_attn"], 2 * 2_048, id="gpt2-c_attn"),
    # default selection = query and value roles; q 64 -> 64, v 64 -> 32 (GQA): 1,024 + 768
    pytest.param("hf:llama", {}, ["q_proj", "v_proj"], 2 * 1_792, id="llama-default-qv"),
    pytest.param("hf:bert", dict(pattern=["query", "value"]), ["query", "value"], 2 * 2_048,
                 id="bert-query-value"),
]


@pytest.fixture(scope="module")
def lora_adapted(zoo: Any) -> Callable[[str], tuple[nn.Module, nn.Module]]:
    """``lora_adapted(name)``: (plain model, LoRA-adapted model) of a LORA_CASES entry."""
    cache: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get(name: str) -> tuple[nn.Module, nn.Module]:
        if name not in cache:
            selection = next(c.values[1] for c in LORA_CASES if c.values[0] == name)
            spec = zoo.spec(name)
            adapted = apply_passes(spec.model, [LoRAPass(rank=8, alpha=16, **selection)],
                                   spec.example_inputs, spec.example_kwargs)
            cache[name] = (spec.model, adapted)
        return cache[name]

    return get


def _peft_counts(model: nn.Module, config: object) -> tuple[int, int]:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(model), config).get_nb_trainable_parameters()


@needs_peft
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("name", "selection", "targets", "expected"), LORA_CASES)
def test_lora_totals_equal_peft(name: str, selection: dict, targets: list[str], expected: int,
                                lora_adapted: Callable) -> None:
    from peft import LoraConfig

    model, adapted = lora_adapted(name)
    ours = audit(adapted)
    theirs = _peft_counts(model, LoraConfig(target_modules=targets, r=8, lora_alpha=16))
    assert (ours.totals.trainable, ours.totals.total) == theirs
    assert ours.totals.trainable == expected
    assert ours.totals.total == sum(p.numel() for p in model.parameters()) + expected
    assert sum(r.params for r in ours.rows) == ours.totals.total
    (lora,) = ours.adapters
    assert len(lora.sites) == 2 * len(targets)


@needs_peft
@pytest.mark.filterwarnings("ignore")
def test_ia3_totals_equal_peft_on_llama(zoo: Any) -> None:
    from peft import IA3Config

    spec = zoo.spec("hf:llama")
    adapted = apply_passes(spec.model, [IA3Pass()], spec.example_inputs, spec.example_kwargs)
    ours = audit(adapted)
    theirs = _peft_counts(spec.model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    assert (ours.totals.trainable, ours.totals.total) == theirs
    assert ours.totals.trainable == 2 * (32 + 32 + 128)  # k, v (64 -> 32) outputs; down_proj input
    rows = {r.name: r for r in ours.rows}
    assert rows["model.layers.0.mlp.down_proj.ia3_l"].params == 128
    (summary,) = ours.adapters  # the vectors are attributed to the adapter and its pass
    assert (summary.pass_name, summary.name, summary.params, summary.trainable_params) == (
        "ia3", "default", 2 * (32 + 32 + 128), 2 * (32 + 32 + 128))
    down = rows["model.layers.0.mlp.down_proj"]  # a site graph, listed as the layer it replaced
    assert (down.type, down.role, down.adapters) == ("Linear", "ffn_down", ("ia3:default",))
    assert rows["model.layers.0.input_layernorm"].type == "LlamaRMSNorm"
    assert ours.model == "LlamaForCausalLM"
    assert audit(adapted, depth=3).rows[1].type == "LlamaDecoderLayer"


@needs_peft
@pytest.mark.filterwarnings("ignore")
def test_gpt2_tied_lm_head_counted_once(lora_adapted: Callable) -> None:
    model, adapted = lora_adapted("hf:gpt2")
    result = audit(adapted)
    rows = {r.name: r for r in result.rows}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (rows["lm_head"].params, rows["lm_head"].trainable) == (0, "no")
    assert rows["lm_head"].tied == ("weight=transformer.wte.weight",)
    assert rows["transformer.wte"].params == 128 * 64
    others = sum(r.params for r in result.rows if r.name != "transformer.wte")
    assert result.totals.total == 128 * 64 + others
    assert rows["transformer.h.0.attn.c_attn"].type == "Conv1D"


@needs_peft
@pytest.mark.filterwarnings("ignore")
def test_roles_only_from_a_cached_map(lora_adapted: Callable) -> None:
    _, adapted = lora_adapted("hf:gpt2")  # selected by pattern: no map was needed
    before = audit(adapted)
    assert adapted._surgery.cached_map is None  # the audit did not trace
    assert {r.role for r in before.rows} == {""} and before.frontend is None
    copied = copy.deepcopy(adapted)
    list_targets(copied)  # builds and caches the map
    after = audit(copied)
    rows = {r.name: r for r in after.rows}
    assert rows["transformer.h.0.attn.c_attn"].role == "qkv (fused)"
    assert rows["transformer.h.0.attn.c_attn.lora_A.default"].role == "qkv (fused)"
    assert after.frontend == "export"
    assert [(r.name, r.params, r.provenance) for r in after.rows] == [
        (r.name, r.params, r.provenance) for r in before.rows]


def test_facade_exports_the_function_after_the_submodule_import() -> None:
    import importlib

    import surgery

    module = importlib.import_module("surgery.audit")
    assert surgery.audit is module.audit  # not the submodule, whatever was imported first
    assert surgery.Audit is module.Audit


def test_an_adapter_without_parameters_says_so() -> None:
    from passes.prefix import PrefixPass

    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [PrefixPass(length=0)], example_inputs=spec.example_inputs)
    lines = str(audit(adapted)).splitlines()
    assert lines[:2] == ["trainable params: 0 || all params: 141,312 || trainable%: 0.0000",
                         "adapter prefix:default: 2 site(s), 0 params, trainable: no parameters, "
                         "active: yes"]


# ---------------------------------------------------------------------------------------
# copies, and a model that is one layer


def _copies(model: nn.Module) -> dict[str, nn.Module]:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buf, weights_only=False)}


def _without_role(row: object) -> tuple:
    return tuple(v for f, v in zip(fields(row), astuple(row)) if f.name != "role")


def test_audit_of_copies(builtin_adapted: nn.Module, builtin_audit: Audit) -> None:
    for how, other in _copies(builtin_adapted).items():
        assert audit(other) == builtin_audit, how  # roles travel with the model
        if how != "deepcopy":
            assert other._surgery.cached_map is None, "a pickled copy leaves the map behind"


def test_a_model_that_is_one_layer() -> None:
    layer = nn.Linear(16, 8)
    adapted = apply_passes(layer, [LoRAPass(pattern="*", rank=2), IA3Pass(pattern="*")])
    result = audit(adapted)
    assert result.model == "Linear" and result.passes == ("lora", "ia3")
    assert [(r.name, r.type, r.params, r.trainable) for r in result.rows] == [
        ("", "Linear", 16 * 8 + 8, "no"),
        ("lora_A.default", "LoRAProjection", 2 * 16, "yes"),
        ("lora_B.default", "LoRAProjection", 8 * 2, "yes"),
        ("ia3_l", "AdapterParameters", 8, "yes")]
    assert result.rows[0].frozen_by == ("lora",) and result.rows[0].adapters == (
        "lora:default", "ia3:default")
    assert result.totals == (2 * 16 + 8 * 2 + 8, 16 * 8 + 8 + 2 * 16 + 8 * 2 + 8,
                             100 * 56 / 192)


def test_a_dora_adapter_says_so() -> None:
    from surgery import LoRAPass, apply_passes, audit, load_model

    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [LoRAPass(pattern="q_proj", use_dora=True, name="d"),
                                        LoRAPass(pattern="v_proj", name="p")])
    summaries = {s.name: s for s in audit(adapted).adapters}
    assert (summaries["d"].variant, summaries["p"].variant) == ("DoRA", "")
    assert summaries["d"].rank_text == "rank 8, DoRA" and summaries["p"].rank_text == "rank 8"
    assert "adapter lora:d: 2 site(s), 2,176 params" in str(audit(adapted))

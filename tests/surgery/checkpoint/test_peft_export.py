"""``surgery.export_peft``: a model's LoRA and IA³ adapters written as PEFT adapter
directories (``surgery/checkpoint/peft_export.py``).

Every test adapts the shared zoo model with fx-surgery's passes, gives the adapters random
values (``B ≠ 0``), exports, loads the files with ``peft.PeftModel.from_pretrained`` onto a
fresh copy of the base model, and compares outputs in float32 to within
``1e-6 · (1 + max|y|)``. Refusals write nothing and leave the model unchanged.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import randomize_adapters
from peft_cases import LAYERS, MODELS, assert_close, assert_differs, load_peft, output
from safetensors.torch import load_file
from torch import nn

from passes.modules import LoRAProjection
from surgery import (
    AdapterNotFoundError,
    CheckpointError,
    IA3Pass,
    LoRAPass,
    MergeLoRAPass,
    PrefixPass,
    SerialAdapterPass,
    TrainModulePass,
    apply_passes,
    combine_adapters,
    export_peft,
    import_peft,
    set_active,
)
from surgery.checkpoint.peft_keys import PREFIX
from surgery.sites.site_graph import recompile_sites

pytestmark = pytest.mark.filterwarnings(  # PEFT's own notes while building the references
    "ignore:fan_in_fan_out is set to:UserWarning",
    "ignore:Setting `save_embedding_layers`:UserWarning")


def exported(model: nn.Module, directory: Path, snapshot, **kwargs) -> list[Path]:
    """``export_peft`` with the model checked unchanged afterwards."""
    before = snapshot(model)
    out = export_peft(model, directory, **kwargs)
    before.assert_unchanged(model)
    return out


def config_of(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", MODELS)
def test_lora_round_trip(name, zoo, tmp_path, snapshot) -> None:
    """Per-layer ranks and alphas (``rank_for`` / ``alpha_for``) go to ``rank_pattern`` /
    ``alpha_pattern``; the keys are PEFT's."""
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(
        pattern=LAYERS[name].lora, rank=4, alpha=8, rank_for=[("re:.*\\.1\\..*", 2)],
        alpha_for=[("re:.*\\.0\\..*", 3)])])
    randomize_adapters(model)
    assert exported(model, tmp_path, snapshot) == [tmp_path]
    config = config_of(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] in (2, 4)
    assert config["rank_pattern"] and config["alpha_pattern"]
    assert config["fan_in_fan_out"] is (name == "hf:gpt2")
    assert config["task_type"] == ("CAUSAL_LM" if name != "hf:bert" else None)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    factors = [m for m in model.modules() if isinstance(m, LoRAProjection)]
    assert len(tensors) == len(factors) == 4 * len(LAYERS[name].lora)
    for factor in factors:
        assert torch.equal(tensors[f"{PREFIX}{factor.site}.lora_{factor.factor}.weight"],
                           factor.weight)
    reference = output(load_peft(name, zoo, tmp_path), spec)
    assert_close(output(model, spec), reference)
    assert_differs(reference, output(spec.model, spec))


@pytest.mark.parametrize("name", MODELS)
def test_ia3_round_trip(name, zoo, tmp_path, snapshot) -> None:
    """IA³ vectors go out as ``(out, 1)``, or ``(1, in)`` for input scaling; on GPT-2's
    fused ``c_attn`` the vector is whole (ones where only key and value learn)."""
    spec = zoo.spec(name)
    layers = LAYERS[name]
    model = apply_passes(spec.model, [IA3Pass(pattern=layers.ia3, feedforward=layers.feedforward)],
                         example_inputs=spec.example_inputs, example_kwargs=spec.example_kwargs)
    randomize_adapters(model)
    exported(model, tmp_path, snapshot)
    config = config_of(tmp_path)
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    shapes = {tuple(t.shape) for t in tensors.values()}
    assert any(s[1] == 1 for s in shapes) and any(s[0] == 1 for s in shapes)
    reference = output(load_peft(name, zoo, tmp_path), spec)
    assert_close(output(model, spec), reference)
    assert_differs(reference, output(spec.model, spec))


def test_named_adapters_in_subdirectories(zoo, tmp_path, snapshot) -> None:
    """``default`` at the root, ``b`` in ``b/``: PEFT loads each, and ``load_adapter``
    adds ``b`` beside ``default``."""
    name = "hf:llama"
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=4),
                                      LoRAPass(pattern=["k_proj", "v_proj"], rank=2, alpha=4,
                                               use_rslora=True, name="b")])
    randomize_adapters(model)
    assert exported(model, tmp_path, snapshot) == [tmp_path, tmp_path / "b"]
    assert config_of(tmp_path / "b")["use_rslora"] is True
    reference = load_peft(name, zoo, tmp_path)
    assert_close(output(set_active(model, ["default"]), spec), output(reference, spec))
    reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
    reference.set_adapter("b")
    assert_close(output(set_active(model, ["b"]), spec), output(reference, spec))
    alone = load_peft(name, zoo, tmp_path / "b", adapter_name="b")
    assert_close(output(set_active(model, ["b"]), spec), output(alone, spec))
    only_b = tmp_path / "only_b"
    assert exported(model, only_b, snapshot, names=["b"]) == [only_b / "b"]
    assert sorted(p.name for p in only_b.iterdir()) == ["b"]


def test_wrapped_models_export_the_bare_keys(zoo, tmp_path, snapshot) -> None:
    """``torch.compile`` and ``DataParallel`` wrappers write the same files as the bare model."""
    model = apply_passes(zoo.spec("hf:bert").model, [LoRAPass(pattern="query", rank=4)])
    randomize_adapters(model)
    exported(model, tmp_path / "bare", snapshot)
    exported(torch.compile(model), tmp_path / "compiled", snapshot)
    exported(nn.DataParallel(model), tmp_path / "parallel", snapshot)
    bare = (tmp_path / "bare" / "adapter_model.safetensors").read_bytes()
    for other in ("compiled", "parallel"):
        assert (tmp_path / other / "adapter_model.safetensors").read_bytes() == bare
        assert config_of(tmp_path / other) == config_of(tmp_path / "bare")


def test_combined_adapter_is_plain_lora(zoo, tmp_path, snapshot) -> None:
    """``combine_adapters`` makes an adapter with alpha = rank; it exports as any LoRA."""
    name = "hf:gpt2"
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(pattern="c_attn", rank=4, alpha=8, name="a"),
                                      LoRAPass(pattern="c_attn", rank=2, alpha=6, name="b")])
    randomize_adapters(model)
    mixed = combine_adapters(model, {"a": 0.7, "b": -0.4}, method="cat", name="ab")
    exported(mixed, tmp_path, snapshot, names=["ab"])
    assert config_of(tmp_path / "ab")["r"] == 6
    reference = load_peft(name, zoo, tmp_path / "ab", adapter_name="ab")
    assert_close(output(mixed, spec), output(reference, spec))


def test_scalings_that_are_neither_plain_nor_rslora(zoo, tmp_path, snapshot) -> None:
    """Layers of one adapter whose scalings follow no single rule: each gets the alpha that
    makes ``alpha / r`` its scaling."""
    name = "hf:llama"
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=4, alpha=8)])
    randomize_adapters(model)
    head = model.get_submodule("model.layers.1.self_attn.q_proj").lora_B["default"]
    head.scaling = 0.3  # as an edited or converted adapter may carry
    for node in model.get_submodule("model.layers.1.self_attn.q_proj").graph.nodes:
        if node.meta.get("surgery", {}).get("part") == "scale":
            node.args = (node.args[0], 0.3)
    recompile_sites(model, ["model.layers.1.self_attn.q_proj"])
    exported(model, tmp_path, snapshot)
    config = config_of(tmp_path)
    assert config["use_rslora"] is False
    assert config["alpha_pattern"] == {r"^model\.layers\.1\.self_attn\.q_proj": 1.2}
    assert_close(output(model, spec), output(load_peft(name, zoo, tmp_path), spec))


@pytest.mark.parametrize("name", MODELS)
def test_trained_modules_go_to_modules_to_save(name, zoo, tmp_path, snapshot) -> None:
    spec = zoo.spec(name)
    saved = LAYERS[name].saved
    model = apply_passes(spec.model, [LoRAPass(pattern=LAYERS[name].lora, rank=4),
                                      TrainModulePass(pattern=saved)])
    randomize_adapters(model)
    with torch.no_grad():
        for param in model.get_submodule(saved).parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    exported(model, tmp_path, snapshot)
    assert config_of(tmp_path)["modules_to_save"] == [saved]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(tensors[f"{PREFIX}{saved}.weight"], model.get_submodule(saved).weight)
    assert_close(output(model, spec), output(load_peft(name, zoo, tmp_path), spec))


def test_classification_head_sets_the_task_type(tmp_path, snapshot) -> None:
    """A sequence classifier whose head trains fully is PEFT's ``SEQ_CLS`` (which trains
    ``classifier``); with the head frozen the task type stays unset."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    trained = apply_passes(base, [LoRAPass(pattern="query", rank=2),
                                  TrainModulePass(pattern="classifier")])
    randomize_adapters(trained)
    exported(trained, tmp_path / "head", snapshot)
    assert config_of(tmp_path / "head")["task_type"] == "SEQ_CLS"
    with pytest.warns(UserWarning, match="task head classifier .* stays frozen"):
        frozen = apply_passes(base, [LoRAPass(pattern="query", rank=2)])
    exported(frozen, tmp_path / "no_head", snapshot)
    assert config_of(tmp_path / "no_head")["task_type"] is None
    peft = pytest.importorskip("peft")
    twin = transformers.BertForSequenceClassification(config).eval()
    twin.load_state_dict(base.state_dict())
    reference = peft.PeftModel.from_pretrained(twin, str(tmp_path / "head")).eval()
    with torch.no_grad():
        assert_close(trained.eval()(ids).logits, reference(input_ids=ids).logits)


def test_base_model_name_from_the_config(zoo, tmp_path, snapshot) -> None:
    model = apply_passes(zoo.spec("hf:llama").model, [LoRAPass(pattern="q_proj")])
    exported(model, tmp_path / "unnamed", snapshot)
    assert config_of(tmp_path / "unnamed")["base_model_name_or_path"] is None
    named = zoo.fresh("hf:llama").model
    named.config.name_or_path = "org/tiny-llama"
    exported(apply_passes(named, [LoRAPass(pattern="q_proj")]), tmp_path / "named", snapshot)
    assert config_of(tmp_path / "named")["base_model_name_or_path"] == "org/tiny-llama"


def test_merged_adapter_warns_and_exports_its_factors(zoo, tmp_path, snapshot) -> None:
    """The files apply to the unmerged base: loaded onto it, they compute the merged model."""
    name = "hf:gpt2"
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(pattern="c_attn", rank=4)])
    randomize_adapters(model)
    merged = apply_passes(model, [MergeLoRAPass()])
    with pytest.warns(UserWarning, match=r"merged into this model's weights: lora:default.*"
                                         r"load them onto the original base model"):
        exported(merged, tmp_path, snapshot)
    assert_close(output(merged, spec), output(load_peft(name, zoo, tmp_path), spec))


def test_round_trip_through_import(zoo, tmp_path, snapshot) -> None:
    """export then import gives back the same adapter tensors, bit for bit."""
    spec = zoo.spec("hf:gpt2")
    model = apply_passes(spec.model, [LoRAPass(pattern=["c_attn", "c_fc"], rank=4,
                                               rank_for=[("c_fc", 2)], dropout=0.1),
                                      TrainModulePass(pattern="transformer.ln_f")])
    randomize_adapters(model)
    exported(model, tmp_path, snapshot)
    back = import_peft(spec.model, tmp_path)
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k or "ln_f" in k}
    theirs = back.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    assert [m.p for m in back.modules() if type(m).__name__ == "LoRADropout"] == [0.1] * 4


# --------------------------------------------------------------------------- refusals


def refused(model: nn.Module, directory: Path, snapshot, match: str, error=CheckpointError,
            **kwargs) -> None:
    """``export_peft`` raises, writes nothing, and leaves the model unchanged."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        export_peft(model, directory, **kwargs)
    before.assert_unchanged(model)
    assert not directory.exists() or not any(directory.rglob("*"))


def test_refuses_bottleneck_adapters_and_prefixes(zoo, tmp_path, snapshot) -> None:
    spec = zoo.spec("builtin:tiny")
    model = apply_passes(spec.model, [LoRAPass(rank=2), SerialAdapterPass(bottleneck=4, name="s")])
    refused(model, tmp_path / "a", snapshot, r"adapter 's' is a serial bottleneck adapter")
    export_peft(model, tmp_path / "lora_only", names=["default"])  # the LoRA one alone is fine
    prefixed = apply_passes(spec.model, [PrefixPass(length=2, name="p")],
                            example_inputs=spec.example_inputs)
    refused(prefixed, tmp_path / "b", snapshot, r"adapter 'p' is a prefix")


def test_refuses_lora_and_ia3_under_one_name(zoo, tmp_path, snapshot) -> None:
    model = apply_passes(zoo.spec("hf:llama").model, [
        LoRAPass(pattern="q_proj"), IA3Pass(pattern="v_proj", feedforward=[]),
        LoRAPass(pattern="k_proj", name="fine")])
    refused(model, tmp_path, snapshot, r"adapter 'default' holds both LoRA and IA³")
    refused(model, tmp_path, snapshot, r"adapter 'default' holds both", names=["fine", "default"])


def test_refuses_dropouts_that_differ(zoo, tmp_path, snapshot) -> None:
    model = apply_passes(zoo.spec("hf:llama").model, [LoRAPass(pattern="q_proj", dropout=0.1),
                                                      LoRAPass(pattern="v_proj", dropout=0.2)])
    refused(model, tmp_path, snapshot, r"different dropouts at different layers \(\[0.1, 0.2\]\)")


def test_refuses_an_adapter_on_the_model_itself(tmp_path, snapshot) -> None:
    model = apply_passes(nn.Linear(4, 4), [LoRAPass(pattern="*", rank=2)])
    refused(model, tmp_path, snapshot, r"adapts the model itself \(Linear\)")


def test_refuses_a_module_registered_in_two_places(tmp_path, snapshot) -> None:
    """fx-surgery adapts a shared module wherever it is used; PEFT only under its first name."""
    lin = nn.Linear(4, 4)
    model = apply_passes(nn.Sequential(lin, nn.ReLU(), lin), [LoRAPass(pattern="0", rank=2)])
    refused(model, tmp_path, snapshot, r"adapts 0, a module the model holds under several names")


def test_refuses_a_trained_module_tied_to_another(zoo, tmp_path, snapshot) -> None:
    """GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``; PEFT would untie them."""
    model = apply_passes(zoo.spec("hf:gpt2").model, [LoRAPass(pattern="c_attn"),
                                                     TrainModulePass(pattern="lm_head")])
    refused(model, tmp_path, snapshot, r"shares the parameter transformer.wte.weight")


def test_refuses_a_module_to_save_peft_cannot_single_out(tmp_path, snapshot) -> None:
    """PEFT matches ``modules_to_save`` by the end of the name: ``head`` would also train
    ``blocks.head``."""
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleDict({"head": nn.Linear(4, 4), "proj": nn.Linear(4, 4)}))
    model.add_module("head", nn.Linear(4, 4))
    adapted = apply_passes(model, [LoRAPass(pattern="proj", rank=2),
                                   TrainModulePass(pattern="re:head")])
    refused(adapted, tmp_path, snapshot, r"would also select blocks.head")


def test_refuses_unknown_names_and_models_without_adapters(zoo, tmp_path, snapshot) -> None:
    model = apply_passes(zoo.spec("hf:llama").model, [LoRAPass(pattern="q_proj")])
    refused(model, tmp_path, snapshot, r"no adapter named 'nope'", error=AdapterNotFoundError,
            names=["nope"])
    refused(zoo.spec("hf:llama").model, tmp_path, snapshot, r"carries no adapter")
    (tmp_path / "file").write_text("")
    refused(model, tmp_path / "file", snapshot, r"is a file, not a directory")


def test_nothing_is_written_when_a_later_adapter_fails(zoo, tmp_path, snapshot) -> None:
    model = apply_passes(zoo.spec("builtin:tiny").model, [
        LoRAPass(rank=2), SerialAdapterPass(bottleneck=4, name="s")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about either
        refused(model, tmp_path, snapshot, r"serial bottleneck", names=["default", "s"])

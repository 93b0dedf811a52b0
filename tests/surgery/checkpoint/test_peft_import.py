"""``surgery.import_peft``: PEFT adapter directories loaded as fx-surgery adapters
(``surgery/checkpoint/peft_import.py``, with ``peft_config.py``, ``peft_targets.py`` and
``peft_keys.py``).

Every test saves an adapter with PEFT itself (random weights: ``init_lora_weights=False`` or
seeded values), imports it onto the shared zoo model, and compares with
``PeftModel.from_pretrained`` in float32 to within ``1e-6 · (1 + max|y|)``; the model given
to ``import_peft`` must come back unchanged.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from peft_cases import (
    LAYERS,
    MODELS,
    ODD_TARGETS,
    OddNames,
    assert_close,
    assert_differs,
    edit_config,
    load_peft,
    output,
    peft,
    peft_model,
    randomize_peft,
    save_peft,
)
from torch import nn

from passes.modules import IA3Vector, LoRAProjection
from surgery import CheckpointError, ConfigError, LoRAPass, apply_passes, import_peft
from surgery.checkpoint.peft_keys import PREFIX

pytestmark = pytest.mark.filterwarnings(  # PEFT's own notes while building the references
    "ignore:fan_in_fan_out is set to:UserWarning",
    "ignore:Setting `save_embedding_layers`:UserWarning")


def lora(**kwargs) -> "peft.LoraConfig":
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    return peft.LoraConfig(init_lora_weights=False, **kwargs)


def roundtrip(name: str, zoo, tmp_path: Path, config, snapshot, **import_kwargs) -> nn.Module:
    """Save a random PEFT adapter, import it onto the shared zoo model, compare outputs with
    PEFT's own loading of the same files; return the imported model."""
    spec = zoo.spec(name)
    save_peft(peft_model(name, zoo, config), tmp_path)
    before = snapshot(spec.model)
    ours = import_peft(spec.model, tmp_path, **import_kwargs)
    before.assert_unchanged(spec.model)
    reference = output(load_peft(name, zoo, tmp_path), spec)
    assert_close(output(ours, spec), reference)
    assert_differs(reference, output(spec.model, spec))
    return ours


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", MODELS)
def test_lora_round_trip(name, zoo, tmp_path, snapshot) -> None:
    ours = roundtrip(name, zoo, tmp_path, lora(target_modules=LAYERS[name].lora), snapshot)
    spec_keys = set(ours.state_dict()) - set(zoo.spec(name).model.state_dict())
    assert spec_keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in spec_keys)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(spec_keys)


@pytest.mark.parametrize("name", MODELS)
def test_ia3_round_trip(name, zoo, tmp_path, snapshot) -> None:
    layers = LAYERS[name]
    config = peft.IA3Config(target_modules=layers.ia3, feedforward_modules=layers.feedforward,
                            init_ia3_weights=False)
    ours = roundtrip(name, zoo, tmp_path, config, snapshot)
    vectors = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Vector)}
    assert vectors
    for qname, vec in vectors.items():
        assert vec.parts == [(0, vec.width)]  # every entry learned, as in PEFT
        assert qname.endswith(".ia3.default")
        feedforward = any(vec.site.endswith(f) for f in layers.feedforward)
        assert vec.mode == ("input" if feedforward else "output")
        param = ours.get_parameter(f"{vec.site}.ia3_l.default")  # PEFT's name and shape
        assert param.shape == ((1, vec.width) if feedforward else (vec.width, 1))


def test_gpt2_fused_qkv_learns_the_whole_ia3_vector(zoo, tmp_path) -> None:
    """PEFT learns every entry of ``c_attn``'s vector; a model whose roles are known (example
    inputs recorded) would give fx-surgery's IA³ the key and value slices only: the import
    widens it to the whole vector."""
    spec = zoo.spec("hf:gpt2")
    config = peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[],
                            init_ia3_weights=False)
    save_peft(peft_model("hf:gpt2", zoo, config), tmp_path)
    with_map = apply_passes(spec.model, [LoRAPass(pattern="c_fc", name="other")],
                            example_inputs=spec.example_inputs)
    ours = import_peft(with_map, tmp_path)
    vec = ours.get_submodule("transformer.h.0.attn.c_attn.ia3.default")
    param = ours.get_parameter("transformer.h.0.attn.c_attn.ia3_l.default")
    assert vec.parts == [(0, 192)] and param.shape == (192, 1)  # PEFT's (out, 1)
    reference = load_peft("hf:gpt2", zoo, tmp_path)
    ours.get_submodule("transformer.h.0.mlp.c_fc").lora_B["other"].weight.data.zero_()
    assert_close(output(ours, spec), output(reference, spec))


def test_non_default_adapter_in_a_subdirectory(zoo, tmp_path, snapshot) -> None:
    """``save_pretrained`` puts adapter ``b`` into ``<dir>/b``; imported under its name."""
    name = "hf:llama"
    spec = zoo.spec(name)
    model = peft.get_peft_model(zoo.fresh(name).model, lora(target_modules=["q_proj"]))
    model.add_adapter("b", lora(target_modules=["v_proj"], r=2))
    randomize_peft(model)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    ours = import_peft(spec.model, tmp_path / "b", adapter_name="b")
    assert {n.split(".lora_")[0] for n, _ in ours.named_parameters() if ".lora_" in n} == {
        f"model.layers.{i}.self_attn.v_proj" for i in range(2)}
    reference = load_peft(name, zoo, tmp_path / "b", adapter_name="b")
    assert_close(output(ours, spec), output(reference, spec))
    default = import_peft(spec.model, tmp_path)
    assert_close(output(default, spec), output(load_peft(name, zoo, tmp_path), spec))


def test_onto_a_compiled_model(zoo, tmp_path) -> None:
    """A ``torch.compile`` wrapper is taken off: same adapter, same outputs."""
    spec = zoo.spec("hf:bert")
    save_peft(peft_model("hf:bert", zoo, lora(target_modules=["query"])), tmp_path)
    ours = import_peft(torch.compile(spec.model), tmp_path)
    assert type(ours) is type(spec.model)
    assert_close(output(ours, spec), output(load_peft("hf:bert", zoo, tmp_path), spec))


# --------------------------------------------------------------------------- PEFT's options


@pytest.mark.parametrize("option", [
    dict(use_rslora=True),
    dict(rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
         alpha_pattern={"q_proj": 3}),
    dict(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32}),
    dict(layers_to_transform=[1]),
    dict(layers_to_transform=0, layers_pattern="layers"),
    dict(layers_to_transform=[1], layers_pattern=["h", "layers"]),
    dict(exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(exclude_modules=r".*layers\.1\..*"),
], ids=["rslora", "rank-alpha-pattern", "rslora-patterns", "layers", "layers-pattern-str",
        "layers-pattern-list", "exclude-list", "exclude-regex"])
def test_lora_options(option, zoo, tmp_path, snapshot) -> None:
    roundtrip("hf:llama", zoo, tmp_path,
              lora(target_modules=["q_proj", "v_proj", "down_proj"], **option), snapshot)


def test_layer_index_as_peft_reads_it(zoo, tmp_path, snapshot) -> None:
    """Without ``layers_pattern`` PEFT reads the layer number only after a second name
    segment: ``layers.1.attn.q_proj`` has none, so nothing is targeted (PEFT refuses too)."""
    config = lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                  layers_pattern="layers")
    ours = roundtrip("builtin:tiny", zoo, tmp_path, config, snapshot)
    assert {m.site for m in ours.modules() if isinstance(m, LoRAProjection)} == {
        "layers.1.attn.q_proj", "layers.1.attn.v_proj"}
    edit_config(tmp_path, layers_pattern=None)
    with pytest.raises(ValueError, match="not found in the base model"):
        load_peft("builtin:tiny", zoo, tmp_path)
    refused(zoo, snapshot, tmp_path, r"targets no module", name="builtin:tiny")


def test_rank_and_alpha_per_layer(zoo, tmp_path, snapshot) -> None:
    """``rank_pattern`` / ``alpha_pattern``: first key matching at a dot boundary wins."""
    config = lora(target_modules=["q_proj", "v_proj"], use_rslora=True,
                  rank_pattern={r"layers\.0\.self_attn\.v_proj": 3, "v_proj": 2},
                  alpha_pattern={"q_proj": 5})
    ours = roundtrip("hf:llama", zoo, tmp_path, config, snapshot)
    got = {m.site: (m.rank, m.alpha, m.scaling) for m in ours.modules()
           if isinstance(m, LoRAProjection) and m.factor == "B"}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 5.0, 5 / 2.0),
        "model.layers.1.self_attn.q_proj": (4, 5.0, 5 / 2.0),
        "model.layers.0.self_attn.v_proj": (3, 8.0, 8 / 3 ** 0.5),
        "model.layers.1.self_attn.v_proj": (2, 8.0, 8 / 2 ** 0.5),
    }


@pytest.mark.parametrize("target", [
    ["c_attn", "c_fc"],
    r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)",
    "all-linear",
], ids=["list", "regex", "all-linear"])
@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_gpt2_targets_and_fan_in_fan_out(target, fan_in_fan_out, zoo, tmp_path, snapshot) -> None:
    """``Conv1D`` layers: A (r, in), B (out, r) whatever ``fan_in_fan_out`` says.
    ``"all-linear"`` leaves out the output layer (``lm_head``)."""
    ours = roundtrip("hf:gpt2", zoo, tmp_path,
                     lora(target_modules=target, fan_in_fan_out=fan_in_fan_out), snapshot)
    sites = {m.site for m in ours.modules() if isinstance(m, LoRAProjection)}
    if target == "all-linear":
        assert len(sites) == 8 and "lm_head" not in sites
    a = ours.get_submodule("transformer.h.1.attn.c_attn").lora_A["default"].weight
    assert a.shape == (4, 64)


def test_all_linear_on_bert(zoo, tmp_path, snapshot) -> None:
    """A model without an output layer: every ``nn.Linear`` (the pooler's too)."""
    ours = roundtrip("hf:bert", zoo, tmp_path, lora(target_modules="all-linear"), snapshot)
    assert "pooler.dense" in {m.site for m in ours.modules() if isinstance(m, LoRAProjection)}


@pytest.mark.parametrize("name", MODELS)
def test_modules_to_save(name, zoo, tmp_path, snapshot) -> None:
    """The saved module is trained fully under its own keys, with the file's values."""
    saved = LAYERS[name].saved
    ours = roundtrip(name, zoo, tmp_path,
                     lora(target_modules=LAYERS[name].lora, modules_to_save=[saved]), snapshot)
    assert saved in ours._surgery.trained_modules
    module = ours.get_submodule(saved)
    assert all(p.requires_grad for p in module.parameters())
    base = zoo.spec(name).model.get_submodule(saved)
    assert not torch.equal(module.weight, base.weight)  # the file's values, not the base's


def test_lora_dropout_in_training(zoo, tmp_path) -> None:
    """``lora_dropout`` draws the same masks as PEFT's from the same seed."""
    name = "hf:llama"
    spec = zoo.spec(name)
    save_peft(peft_model(name, zoo, lora(target_modules=["q_proj", "v_proj"], lora_dropout=0.3)),
              tmp_path)
    ours = import_peft(spec.model, tmp_path)
    drops = [m.p for m in ours.modules() if type(m).__name__ == "LoRADropout"]
    assert drops == [0.3] * 4
    reference = load_peft(name, zoo, tmp_path)
    outs = []
    for model in (ours, reference):
        model.train()
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model(*spec.example_inputs, **spec.example_kwargs).logits)
    assert_close(outs[0], outs[1])
    torch.manual_seed(8)
    with torch.no_grad():
        other = ours(*spec.example_inputs, **spec.example_kwargs).logits
    assert_differs(other, outs[0])  # the masks are random: another seed, other outputs


def test_module_names_holding_weight_lora_and_base(tmp_path, snapshot) -> None:
    """Keys map by structure: ``base_model.model.base_model.model.lora_A.weight`` is the
    LoRA A of the layer named ``base_model.model``."""
    torch.manual_seed(0)
    base = OddNames()
    twin = OddNames()
    twin.load_state_dict(base.state_dict())
    reference = peft.get_peft_model(twin, lora(target_modules=ODD_TARGETS))
    randomize_peft(reference)
    save_peft(reference, tmp_path)
    before = snapshot(base)
    ours = import_peft(base, tmp_path)
    before.assert_unchanged(base)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(ours(x), reference.eval()(x))
    assert ours.base_model["model"].lora_A["default"].weight.shape == (4, 8)
    assert ours.lora_A.lora_A["default"].weight.shape == (4, 16)


def test_keeps_the_saved_dtype_or_casts_when_asked(zoo, tmp_path, snapshot) -> None:
    name = "hf:bert"
    spec = zoo.spec(name)
    save_peft(peft_model(name, zoo, lora(target_modules=["query"])), tmp_path)
    query = "encoder.layer.0.attention.self.query"
    fp32 = import_peft(spec.model, tmp_path)
    assert fp32.get_submodule(query).lora_A["default"].weight.dtype == torch.float32
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))
    before = snapshot(spec.model)
    with pytest.raises(CheckpointError,
                       match=r"torch.bfloat16 into torch.float32.*dtype=torch.float32"):
        import_peft(spec.model, tmp_path)
    before.assert_unchanged(spec.model)
    cast = import_peft(spec.model, tmp_path, dtype=torch.float32)
    weight = cast.get_submodule(query).lora_A["default"].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, load_file(str(path))[f"{PREFIX}{query}.lora_A.weight"].float())
    bf16_base = zoo.fresh(name).model.to(torch.bfloat16)
    kept = import_peft(bf16_base, tmp_path)
    assert kept.get_submodule(query).lora_B["default"].weight.dtype == torch.bfloat16
    assert output(kept, spec).dtype == torch.bfloat16  # and it runs, in bfloat16


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def llama_lora_dir(zoo, tmp_path) -> Path:
    """A PEFT LoRA adapter of hf:llama (q_proj, v_proj) saved in ``tmp_path``."""
    return save_peft(peft_model("hf:llama", zoo, lora(target_modules=["q_proj", "v_proj"])),
                     tmp_path)


def refused(zoo, snapshot, directory: Path, match: str, name: str = "hf:llama", **kwargs) -> None:
    """``import_peft`` raises CheckpointError matching ``match``, the model unchanged."""
    model = zoo.spec(name).model
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        import_peft(model, directory, **kwargs)
    before.assert_unchanged(model)


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), r"Missing keys: .*q_proj\.lora_magnitude_vector"),
    (dict(bias="lora"), r"bias='lora'; PEFT's LoRA knows 'none', 'lora_only' and 'all'"),
    (dict(lora_bias=True), r"a bias on lora_B"),
    (dict(trainable_token_indices=[1, 2]), r"trainable token indices"),
    (dict(target_parameters=["mlp.experts.down_proj"]), r"target_parameters"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), r"Megatron"),
    (dict(layer_replication=[[0, 2], [1, 2]]), r"layer replication"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*rewrites the base"),
    (dict(peft_type="LOHA"), r"a 'LOHA' adapter"),
    (dict(target_modules=None), r"target_modules=null"),
    (dict(some_future_setting={"on": True}), r"some_future_setting.*does not know"),
    (dict(r=0), r"r must be a positive integer"),
    (dict(target_modules="q_proj(", ), r"not a valid regular expression"),
    (dict(target_modules=["no_such_layer"]), r"targets no module.*Nearest module names"),
    (dict(layers_pattern="layers", layers_to_transform=None), r"needs layers_to_transform"),
    (dict(modules_to_save=["self_attn"]), r"targets no module"),  # saved modules are not adapted
    (dict(modules_to_save=["proj"]), r"modules_to_save selects .*q_proj, which is an adapted"),
    (dict(modules_to_save=["default"]), r"reaches .*lora_dropout.default, a module PEFT inserts"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_refuses_what_it_cannot_reproduce(changes, match, llama_lora_dir, zoo, snapshot) -> None:
    edit_config(llama_lora_dir, **changes)
    refused(zoo, snapshot, llama_lora_dir, match)


class ScaledEmbedding(nn.Embedding):
    """An embedding with a forward of its own (as Gemma's scales its output)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


@pytest.mark.parametrize("layer, match", [
    (nn.Conv2d(3, 4, 3, dilation=2), r"LoRA on 0 \(Conv2d, dilation=\(2, 2\)\); PEFT's lora_A "
                                     r"convolution ignores the layer's dilation"),
    (nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"),
     r"LoRA on 0 \(Conv1d, padding_mode='reflect'\)"),
    (ScaledEmbedding(10, 3), r"LoRA on 0 \(ScaledEmbedding\); .* running torch's own forward"),
], ids=["dilation", "padding_mode", "embedding_subclass"])
def test_refuses_a_layer_peft_adapts_otherwise(layer, match, tmp_path, snapshot) -> None:
    """PEFT's lora_A ignores a convolution's dilation and padding mode (fx-surgery's follows
    the layer), and an embedding subclass with a forward of its own is not adapted here."""
    reference = peft.get_peft_model(nn.Sequential(copy.deepcopy(layer)), lora(target_modules=["0"]))
    save_peft(reference, tmp_path)
    base = nn.Sequential(layer)
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=match):
        import_peft(base, tmp_path)
    before.assert_unchanged(base)


def test_refuses_a_tied_module_to_save(zoo, tmp_path, snapshot) -> None:
    """GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``: PEFT trains an untied copy."""
    spec = zoo.spec("hf:gpt2")
    save_peft(peft_model("hf:gpt2", zoo, lora(target_modules=["c_attn"])), tmp_path)
    edit_config(tmp_path, modules_to_save=["lm_head"])
    refused(zoo, snapshot, tmp_path, r"tied to transformer.wte.weight", name="hf:gpt2")
    assert spec.model.lm_head.weight is spec.model.transformer.wte.weight


def test_refuses_a_module_registered_in_two_places(tmp_path, snapshot) -> None:
    """PEFT replaces a module shared by two parents in the first place only."""
    shared = nn.Linear(4, 4)
    reference = peft.get_peft_model(nn.Sequential(shared, nn.ReLU(), shared),
                                    lora(target_modules=["0"], r=2))
    save_peft(reference, tmp_path)
    lin = nn.Linear(4, 4)
    base = nn.Sequential(lin, nn.ReLU(), lin)
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=r"adapts 0, a module the model holds under several "
                                              r"names \(0, 2\)"):
        import_peft(base, tmp_path)
    before.assert_unchanged(base)


def test_refuses_a_pickle(llama_lora_dir, zoo, snapshot) -> None:
    (llama_lora_dir / "adapter_model.safetensors").rename(llama_lora_dir / "adapter_model.bin")
    refused(zoo, snapshot, llama_lora_dir, r"adapter_model.bin, a pickle")


def test_refuses_a_taken_adapter_name(llama_lora_dir, zoo, snapshot) -> None:
    adapted = apply_passes(zoo.spec("hf:llama").model, [LoRAPass(pattern="k_proj", name="x")])
    before = snapshot(adapted)
    with pytest.raises(CheckpointError, match=r"already carries an adapter named 'x'"):
        import_peft(adapted, llama_lora_dir, adapter_name="x")
    before.assert_unchanged(adapted)
    both = import_peft(adapted, llama_lora_dir, adapter_name="y")  # beside it, under another name
    assert {m.adapter_name for m in both.modules() if isinstance(m, LoRAProjection)} == {"x", "y"}
    with pytest.raises(ConfigError, match=r"import_peft: adapter_name 'not\.a\.name' contains"):
        import_peft(adapted, llama_lora_dir, adapter_name="not.a.name")


def test_missing_directory_and_files(tmp_path, zoo, snapshot) -> None:
    refused(zoo, snapshot, tmp_path / "nowhere", r"there is no directory")
    refused(zoo, snapshot, tmp_path, r"adapter_config.json is missing")


# --------------------------------------------------------------------------- mismatches


def rewrite(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


Q0 = PREFIX + "model.layers.0.self_attn.q_proj"


def test_missing_keys(llama_lora_dir, zoo, snapshot) -> None:
    rewrite(llama_lora_dir, lambda t: [t.pop(k) for k in list(t) if k.startswith(Q0)])
    refused(zoo, snapshot, llama_lora_dir,
            rf"Missing keys: {Q0}\.lora_A\.weight, {Q0}\.lora_B\.weight; nearest names present")


def test_unexpected_keys(llama_lora_dir, zoo, snapshot) -> None:
    def add(t):
        for i in range(7):
            t[f"{PREFIX}model.layers.0.mlp.x{i}.lora_A.weight"] = torch.zeros(4, 64)
        t[Q0 + ".lora_magnitude_vector"] = torch.zeros(64)
        t["model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
        t[PREFIX + "model.embed_tokens.weight"] = torch.zeros(128, 64)

    rewrite(llama_lora_dir, add)
    model = zoo.spec("hf:llama").model
    with pytest.raises(CheckpointError, match=r"Unexpected keys \(10\): ") as info:
        import_peft(model, llama_lora_dir)
    message = str(info.value)
    x0 = re.escape(f"{PREFIX}model.layers.0.mlp.x0.lora_A.weight")
    assert re.search(rf"a LoRA layer the settings do not target: {x0}, .*\(7 in all\)", message)
    assert re.search(rf"DoRA's magnitude vector: {re.escape(Q0)}\.lora_magnitude_vector", message)
    assert "not starting with 'base_model.model.': model.layers.0.self_attn.k_proj" in message
    assert re.search(r"weights of the base model that differ from this model's \(PEFT saves "
                     r"embedding layers after a vocabulary resize.*\): "
                     r"base_model.model.model.embed_tokens.weight", message)
    assert "nearest expected: " in message


def test_shape_mismatches(llama_lora_dir, zoo, snapshot) -> None:
    rewrite(llama_lora_dir, lambda t: t.update({Q0 + ".lora_A.weight": torch.zeros(5, 64)}))
    refused(zoo, snapshot, llama_lora_dir,
            rf"Shape mismatches: {Q0}\.lora_A\.weight saved \(5, 64\), expected \(4, 64\)")
    edit_config(llama_lora_dir, r=2)  # every LoRA tensor is now the wrong shape
    refused(zoo, snapshot, llama_lora_dir, r"Shape mismatches: .*\(8 in all\)")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_tensors_file(damage, llama_lora_dir, zoo, snapshot) -> None:
    path = llama_lora_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not safetensors" * 9,
                      "empty": b""}[damage])
    refused(zoo, snapshot, llama_lora_dir, r"not a readable safetensors file")


def test_corrupt_config(llama_lora_dir, zoo, snapshot) -> None:
    (llama_lora_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    refused(zoo, snapshot, llama_lora_dir, r"not valid JSON")
    (llama_lora_dir / "adapter_config.json").write_text(json.dumps(["LORA"]))
    refused(zoo, snapshot, llama_lora_dir, r"holds a JSON list")


@pytest.mark.parametrize("save_embedding_layers", ["auto", True])
def test_embedding_weights_peft_saves_beside_the_adapter(zoo, tmp_path: Path,
                                                         save_embedding_layers) -> None:
    """LoRA on an embedding saved with PEFT's default ``save_embedding_layers="auto"`` also
    stores the embedding's whole weight (``embed_tokens.base_layer.weight``): equal to the
    base model's, it is skipped, and the outputs are PEFT's; a changed one is refused."""
    from safetensors.torch import load_file, save_file

    spec = zoo.spec("hf:llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(zoo.fresh("hf:llama").model, config)
    theirs.save_pretrained(str(tmp_path / "a"), save_embedding_layers=save_embedding_layers)
    ours = import_peft(spec.model, tmp_path / "a")
    ids = spec.example_inputs[0]
    theirs.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    stored = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in stored if k.endswith("embed_tokens.base_layer.weight")
               or k.endswith("embed_tokens.weight"))
    stored[key] = stored[key] + 1.0
    save_file(stored, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights of the base model that differ"):
        import_peft(spec.model, tmp_path / "a")

"""What ``surgery.save_adapters`` / ``surgery.load_adapters`` refuse, and how
(``surgery/checkpoint/``).

Every refusal is a :class:`surgery.errors.CheckpointError` (or the ``ConfigError`` /
``AdapterNotFoundError`` of a bad argument) whose message names the offending keys or
files, the nearest valid names and the way out, and leaves the caller's model exactly as
it was; a failing save leaves the checkpoint already in the directory whole. Loading never
unpickles anything.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_cases import perturb
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from passes.stack import AdapterStack
from surgery import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    apply_passes,
    combine_adapters,
    load_adapters,
    save_adapters,
)
from surgery.checkpoint.inspect import inspect_checkpoint
from surgery.checkpoint.save import INPUTS_FILE, RECIPE_FILE, TENSORS_FILE
from surgery.cli import main
from surgery.map.example_inputs import NOTE_START
from surgery.zoo import ConvNet, TinyConfig, TinyTransformer, load_model

QV = ["q_proj", "v_proj"]
KEY = "layers.0.attn.q_proj.lora_A.a.weight"


@pytest.fixture(scope="module")
def adapted(zoo) -> nn.Module:
    """The builtin TinyTransformer with LoRA ``a`` (q, v) and IA³ ``b`` (k), perturbed."""
    model = apply_passes(zoo.spec("builtin").model, [LoRAPass(pattern=QV, rank=4, name="a"),
                                                     IA3Pass(pattern="k_proj", name="b")])
    perturb(model)
    return model


@pytest.fixture(scope="module")
def saved(adapted, tmp_path_factory) -> Path:
    """A checkpoint of :func:`adapted`; tests edit copies of it."""
    return save_adapters(adapted, tmp_path_factory.mktemp("saved"))


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A copy of the checkpoint, for a test to break."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def refused(base: nn.Module, directory: Path | str, snapshot, match: str, **kwargs: object
            ) -> str:
    """``load_adapters`` raises CheckpointError matching ``match``; ``base`` and the RNG
    state stay as they were. Returns the message."""
    before = snapshot(base)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=match) as info:
        load_adapters(base, directory, **kwargs)
    before.assert_unchanged(base)
    assert torch.equal(torch.get_rng_state(), rng)
    return str(info.value)


def edit_tensors(ckpt: Path, change) -> None:
    """Rewrite ``adapters.safetensors`` with ``change(tensors)`` applied."""
    tensors = load_file(ckpt / TENSORS_FILE)
    change(tensors)
    save_file(tensors, ckpt / TENSORS_FILE, metadata={"format": "fx-surgery-adapters"})


def edit_recipe(ckpt: Path, change) -> None:
    recipe = json.loads((ckpt / RECIPE_FILE).read_text())
    change(recipe)
    (ckpt / RECIPE_FILE).write_text(json.dumps(recipe))


# ---- keys and shapes ----------------------------------------------------------------------


def test_tensor_missing_from_the_file(zoo, ckpt, snapshot) -> None:
    edit_tensors(ckpt, lambda t: t.pop(KEY))
    msg = refused(zoo.spec("builtin").model, ckpt, snapshot,
                  r"adapters.safetensors and surgery_config.json disagree: tensors missing from "
                  r"the file \(1\): layers.0.attn.q_proj.lora_A.a.weight \(nearest present")
    assert "layers.0.attn.v_proj.lora_A.a.weight" in msg or "lora_B.a.weight" in msg


def test_missing_keys_first_few_then_a_count(zoo, ckpt, snapshot) -> None:
    def drop_a(t: dict) -> None:
        for key in [k for k in t if ".a." in k]:
            del t[key]

    edit_tensors(ckpt, drop_a)
    edit_recipe(ckpt, lambda r: drop_a(r["tensors"]))  # the files agree; the recipe builds them
    msg = refused(zoo.spec("builtin").model, ckpt, snapshot,
                  r"does not fit the adapters its recipe builds on this model: missing keys "
                  r"\(8\): layers.0.attn.q_proj.lora_A.a.weight, .*, \.\.\. \(3 more\) "
                  r"\(nearest present to 'layers.0.attn.q_proj.lora_A.a.weight': ")
    assert "layers.0.attn.k_proj.ia3_l.b" in msg  # the nearest names present


def test_unexpected_keys(zoo, ckpt, snapshot) -> None:
    extra = "layers.0.attn.q_proj.lora_C.a.weight"
    edit_tensors(ckpt, lambda t: t.update({extra: torch.ones(4, 64)}))
    edit_recipe(ckpt, lambda r: r["tensors"].update({extra: dict(
        r["tensors"][KEY], shape=[4, 64])}))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"unexpected keys \(1\): layers.0.attn.q_proj.lora_C.a.weight \(nearest present to "
            r"'layers.0.attn.q_proj.lora_C.a.weight': layers.0.attn.q_proj.lora_A.a.weight")


def test_dtype_edited_in_the_file(zoo, ckpt, snapshot) -> None:
    edit_tensors(ckpt, lambda t: t.update({KEY: t[KEY].half()}))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"layers.0.attn.q_proj.lora_A.a.weight \(\[4, 64\] float16 in the file, \[4, 64\] "
            r"float32 listed\)")


def test_dtype_other_than_the_layers_is_refused_with_the_cast_to_ask_for(zoo, ckpt,
                                                                        snapshot) -> None:
    edit_tensors(ckpt, lambda t: t.update({KEY: t[KEY].half()}))
    edit_recipe(ckpt, lambda r: r["tensors"][KEY].update(dtype="float16"))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"1 tensor\(s\) are in another dtype than the layers they adapt.*"
            r"lora_A.a.weight \(float16, the layer here is float32\).*"
            r"dtype=torch.float32")


def test_shape_mismatch(zoo, ckpt, snapshot) -> None:
    edit_tensors(ckpt, lambda t: t.update({KEY: torch.ones(3, 64)}))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"1 tensor\(s\) have another shape or dtype in adapters.safetensors than in "
            r"surgery_config.json: layers.0.attn.q_proj.lora_A.a.weight \(\[3, 64\] float32 "
            r"in the file, \[4, 64\] float32 listed\)")
    edit_recipe(ckpt, lambda r: r["tensors"][KEY].update(shape=[3, 64]))  # both edited
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"1 tensor\(s\) do not fit their place: layers.0.attn.q_proj.lora_A.a.weight "
            r"\(\(3, 64\) in the checkpoint, \(4, 64\) here\)")


@pytest.mark.parametrize("other", ["more_layers", "hidden_size", "class"])
def test_another_architecture(ckpt, snapshot, other: str) -> None:
    with torch.random.fork_rng(devices=[]):
        base = {"more_layers": lambda: TinyTransformer(TinyConfig(n_layers=3)),
                "hidden_size": lambda: TinyTransformer(TinyConfig(d_model=32)),
                "class": ConvNet}[other]()
    match = {
        "more_layers": r"saved from another architecture than this TinyTransformer: 12 "
                       r"module\(s\) of this model were not in the checkpoint's base: layers.2, "
                       r"layers.2.ln_1, layers.2.attn, .*, \.\.\. \(7 more\)",
        "hidden_size": r"saved from another architecture than this TinyTransformer: 35 "
                       r"parameter\(s\) differ in shape: embed.weight \(\[256, 32\] here, "
                       r"\[256, 64\] in the checkpoint\), .*\(30 more\)",
        "class": r"saved from another architecture than this ConvNet: the model class is "
                 r"ConvNet, the checkpoint's base was TinyTransformer",
    }[other]
    msg = refused(base, ckpt, snapshot, match)
    assert "Way out: load it onto the base model it was trained on" in msg


def test_tie_missing_from_the_base(zoo, tmp_path, snapshot) -> None:
    train_module = pytest.importorskip("passes.train_module")
    spec = zoo.spec("hf:gpt2")
    model = apply_passes(spec.model, [train_module.TrainModulePass(pattern="transformer.wte")])
    perturb(model)
    save_adapters(model, tmp_path)
    untied = load_model("hf:gpt2").model
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    refused(untied, tmp_path, snapshot,
            r"1 tensor\(s\) were tied in the saved model and are not in this base: "
            r"transformer.wte.weight / lm_head.weight")


# ---- files --------------------------------------------------------------------------------


def test_truncated_tensors_file(zoo, ckpt, snapshot) -> None:
    data = (ckpt / TENSORS_FILE).read_bytes()
    (ckpt / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"adapters.safetensors' is not a readable safetensors file .* it may be truncated "
            r"or corrupt\. Nothing was loaded")


def test_garbage_json(zoo, ckpt, snapshot) -> None:
    (ckpt / RECIPE_FILE).write_text('{"format": "fx-surgery-adapters", "steps": [')
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"surgery_config.json' is not valid JSON .*truncated or corrupt")
    (ckpt / RECIPE_FILE).write_text("[1, 2]")
    refused(zoo.spec("builtin").model, ckpt, snapshot, r"holds a JSON list, not an object")


@pytest.mark.parametrize("name", [TENSORS_FILE, RECIPE_FILE])
def test_missing_file(zoo, ckpt, snapshot, name: str) -> None:
    (ckpt / name).unlink()
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            rf"{name} is missing from '.*ckpt' \(it holds: ")


def test_directory_that_does_not_exist(zoo, tmp_path, snapshot) -> None:
    refused(zoo.spec("builtin").model, tmp_path / "nowhere", snapshot,
            r"there is no directory '.*nowhere'")
    (tmp_path / "file").write_text("x")
    refused(zoo.spec("builtin").model, tmp_path / "file", snapshot,
            r"'.*file' is a file, not a directory")


def test_another_format_or_a_newer_version(zoo, ckpt, snapshot) -> None:
    edit_recipe(ckpt, lambda r: r.update(version=99))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"format version 99; this version of fx-surgery reads up to 1\. Way out: upgrade")
    edit_recipe(ckpt, lambda r: r.update(format="something-else", version=1))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"is not an fx-surgery adapter recipe \(format 'something-else'\)\.$")
    (ckpt / "surgery_config.json").unlink()
    (ckpt / "adapter_config.json").write_text("{}")  # a PEFT directory: say so
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"holds a PEFT adapter \(adapter_config.json\), not an fx-surgery checkpoint.*"
            r"surgery.import_peft")


def test_unknown_pass_in_the_recipe(zoo, ckpt, snapshot) -> None:
    edit_recipe(ckpt, lambda r: r["steps"][0].update({"pass": "lorra"}))
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"recipe step 'lorra' cannot be rebuilt: no pass is named 'lorra'; known passes "
            r"\(nearest first\): lora")


def test_name_not_in_the_checkpoint(zoo, ckpt, snapshot) -> None:
    refused(zoo.spec("builtin").model, ckpt, snapshot,
            r"the checkpoint holds no adapter named 'c'; it holds \(nearest first\): 'a', 'b'",
            names=["a", "c"])


def test_combined_adapter_needs_its_sources(zoo, tmp_path, snapshot, adapted) -> None:
    two = apply_passes(adapted, [LoRAPass(pattern=QV, rank=4, name="x")])
    combined = combine_adapters(two, {"a": 0.5, "x": 0.5}, name="ax")
    save_adapters(combined, tmp_path)
    refused(zoo.spec("builtin").model, tmp_path, snapshot,
            r"adapter 'ax' was combined from \['a', 'x'\]; load those as well", names=["ax"])


class _Logits(nn.Module):
    """A transformers model behind a wrapper of the user's: torch.fx cannot trace it, and
    no inputs can be made up for it from a config."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids).logits


def test_role_selection_without_inputs_names_the_way_out(zoo, tmp_path, snapshot) -> None:
    spec = zoo.spec("hf:llama")
    wrapped = _Logits(spec.model)
    model = apply_passes(wrapped, [LoRAPass(rank=2)], spec.example_inputs)
    perturb(model)
    save_adapters(model, tmp_path)
    (tmp_path / INPUTS_FILE).unlink()
    edit_recipe(tmp_path, lambda r: r.update(example_inputs=None))
    refused(wrapped, tmp_path, snapshot,
            r"step 0 of the recipe, LoRAPass\(rank=2\), fails on this _Logits: .*"
            r"example_inputs")
    loaded = load_adapters(wrapped, tmp_path, example_inputs=spec.example_inputs)
    with torch.no_grad():
        assert torch.equal(loaded(*spec.example_inputs), model(*spec.example_inputs))


def test_role_selection_without_inputs_on_a_transformers_model_makes_them_up(
        zoo, tmp_path) -> None:
    spec = zoo.spec("hf:llama")
    model = apply_passes(spec.model, [LoRAPass(rank=2)], spec.example_inputs)
    perturb(model)
    save_adapters(model, tmp_path)
    (tmp_path / INPUTS_FILE).unlink()
    edit_recipe(tmp_path, lambda r: r.update(example_inputs=None))
    loaded = load_adapters(spec.model, tmp_path)  # the map is traced on made-up inputs
    assert any(n.startswith(NOTE_START) for n in loaded._surgery.notes)
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(loaded(*spec.example_inputs).logits, model(*spec.example_inputs).logits)


# ---- nothing is unpickled -----------------------------------------------------------------


class _Trap:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_loading_never_unpickles(zoo, ckpt, snapshot, monkeypatch, tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Trap(str(marker)))
    for name in ("adapters.bin", "pytorch_model.bin", "example_inputs.pt", "surgery_config.pkl"):
        (ckpt / name).write_bytes(payload)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_adapters unpickled something")

    class NoUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    base = zoo.spec("builtin").model
    loaded = load_adapters(base, ckpt)
    monkeypatch.undo()
    assert not marker.exists()
    assert torch.equal(loaded.state_dict()[KEY], load_file(ckpt / TENSORS_FILE)[KEY])
    pickle.loads(payload)  # the trap works: it is only never sprung by loading
    assert marker.exists()


# ---- save_adapters ------------------------------------------------------------------------


def test_save_refuses_a_model_without_adapters(zoo, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"save_adapters: the TinyTransformer given carries no "
                                          r"adapters\. Way out: save the model returned by "
                                          r"surgery.apply_passes"):
        save_adapters(zoo.spec("builtin").model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_unknown_names(adapted, tmp_path) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"save_adapters: the model has no adapter "
                                                   r"named 'c'; adapters present \(nearest "
                                                   r"first\): 'a', 'b'"):
        save_adapters(adapted, tmp_path, names=["a", "c"])
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_file_as_directory(adapted, tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match=r"'.*file' is a file, not a directory"):
        save_adapters(adapted, target)
    assert target.read_text() == "keep me"


def test_save_refuses_a_combined_adapter_without_its_sources(adapted, tmp_path) -> None:
    combined = combine_adapters(adapted, {"a": 1.0}, name="c")
    with pytest.raises(CheckpointError, match=r"save_adapters: adapter 'c' was combined from "
                                              r"\['a'\], and \['a'\] would not be saved.*Way "
                                              r"out: names=\[\.\.\., 'a'\] as well"):
        save_adapters(combined, tmp_path, names=["c"])
    assert list(tmp_path.iterdir()) == []


def test_failing_save_leaves_the_checkpoint_whole(adapted, ckpt, monkeypatch) -> None:
    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}

    before = contents()
    other = apply_passes(adapted, [LoRAPass(pattern="o_proj", rank=2, name="z")])
    combined = combine_adapters(adapted, {"a": 1.0}, name="c")
    with pytest.raises(AdapterNotFoundError):
        save_adapters(other, ckpt, names=["nope"])
    with pytest.raises(CheckpointError):
        save_adapters(combined, ckpt, names=["c"])
    assert contents() == before

    import surgery.checkpoint.files as files

    def disk_full(data: dict, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapters(other, ckpt)
    assert contents() == before  # no file replaced, no temporary file left behind


def test_save_of_an_adapter_stack_is_the_model_s(adapted, tmp_path) -> None:
    stack = AdapterStack(adapted)
    save_adapters(stack, tmp_path)
    keys = json.loads((tmp_path / RECIPE_FILE).read_text())["tensors"]
    assert KEY in keys and not any(k.startswith("model.") for k in keys)
    plain = nn.Sequential(nn.Linear(2, 2))  # a wrapper without an adapted ``model``: refused
    with pytest.raises(ConfigError, match="carries no adapters"):
        save_adapters(plain, tmp_path / "plain")


def test_recipe_that_cannot_be_json(adapted, ckpt, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    from surgery.checkpoint import save as save_module

    monkeypatch.setattr(save_module, "fingerprint", lambda model: {"digest": io.BytesIO()})
    with pytest.raises(CheckpointError, match=r"cannot be written as JSON .*Nothing was written"):
        save_adapters(adapted, ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


# ---- devices, arguments, paths, and inspect on broken files --------------------------------


def test_a_base_on_the_meta_device_is_refused(zoo, ckpt, snapshot) -> None:
    with torch.device("meta"):
        meta = load_model("builtin").model
    with pytest.raises(CheckpointError, match=r"on the meta device.*to_empty"):
        load_adapters(meta, ckpt)


def test_saving_adapters_on_the_meta_device_is_refused(tmp_path: Path) -> None:
    with torch.device("meta"):
        meta = apply_passes(load_model("builtin").model, [LoRAPass(pattern=QV)])
    with pytest.raises(CheckpointError, match=r"on the meta device .* hold no values to save"):
        save_adapters(meta, tmp_path / "out")
    assert not (tmp_path / "out" / TENSORS_FILE).exists()


@pytest.mark.parametrize("dtype", ["float16", torch.int8])
def test_dtype_must_be_a_floating_torch_dtype(zoo, ckpt, dtype) -> None:
    with pytest.raises(ConfigError, match=r"dtype must be a floating-point torch.dtype"):
        load_adapters(zoo.spec("builtin").model, ckpt, dtype=dtype)


def test_empty_names_is_a_config_error(zoo, ckpt, adapted, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"names is an empty list.*'a', 'b'"):
        load_adapters(zoo.spec("builtin").model, ckpt, names=[])
    with pytest.raises(ConfigError, match=r"export_peft: names is an empty list"):
        surgery.export_peft(adapted, tmp_path / "peft", names=[])


def test_a_directory_under_a_file_is_a_checkpoint_error(adapted, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint directory"):
        save_adapters(adapted, tmp_path / "afile" / "sub")


def test_import_peft_points_at_the_right_loader_or_subfolder(zoo, ckpt, tmp_path: Path) -> None:
    base = zoo.spec("builtin").model
    with pytest.raises(CheckpointError, match=r"an fx-surgery checkpoint.*load_adapters"):
        surgery.import_peft(base, ckpt)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"subdirectories \['other'\] do.*other'"):
        surgery.import_peft(base, tmp_path)


def test_inspect_lists_problems_of_a_broken_checkpoint(ckpt, capsys) -> None:
    edit_tensors(ckpt, lambda t: t.update({KEY: t[KEY].half()}))
    edit_recipe(ckpt, lambda r: r["steps"].append({"pass": "nonexistent", "config": {}}))
    summary = inspect_checkpoint(ckpt)
    assert not summary.ok and len(summary.problems) == 2
    assert "float16 in the file" in summary.problems[0]
    assert summary.problems[1].startswith("step 2:") and "nonexistent" in summary.problems[1]
    assert main(["inspect", str(ckpt)]) == 2
    assert "problem: " in capsys.readouterr().out


def test_inspect_of_a_malformed_recipe_is_a_clean_error(ckpt, capsys) -> None:
    edit_recipe(ckpt, lambda r: r.update(steps=None))
    with pytest.raises(CheckpointError, match=r"the recipe's 'steps' entry is malformed"):
        inspect_checkpoint(ckpt)
    assert main(["inspect", str(ckpt)]) == 2
    assert "CheckpointError" in capsys.readouterr().err

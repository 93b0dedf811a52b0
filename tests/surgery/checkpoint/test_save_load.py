"""Round trips through ``surgery.save_adapters`` / ``surgery.load_adapters``
(``surgery/checkpoint/save.py``, ``load.py``, ``recipe.py``, ``state.py``).

Every adapter parameter is perturbed to non-zero random values before saving, so a load
that did not put the saved tensors in place (a fresh LoRA ``B`` is zero, a fresh gate is
zero) fails the bitwise checks. Each load checks that the base model it was given stays
exactly as it was and that the global RNG state does not move.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from checkpoint_cases import (
    adapter_keys,
    assert_loaded_like,
    hand_written,
    load_checked,
    perturb,
    trainable,
)
from conftest import first_tensor
from safetensors.torch import load_file
from torch import nn

import surgery
from passes.adapters import SerialAdapterPass
from passes.modules import IA3Vector
from passes.parallel_adapter import ParallelAdapterPass
from passes.prefix import EjectPrefixPass, PrefixPass
from passes.stack import AdapterStack
from surgery import (
    IA3Pass,
    LoRAPass,
    MergeIA3Pass,
    MergeLoRAPass,
    UnmergeIA3Pass,
    UnmergeLoRAPass,
    active_adapters,
    apply_passes,
    combine_adapters,
    merged_adapters,
    save_adapters,
    set_active,
    set_trainable,
)
from surgery.checkpoint.save import INPUTS_FILE, RECIPE_FILE, TENSORS_FILE
from surgery.errors import CheckpointError
from surgery.zoo import ModelSpec, load_model

HAND_WRITTEN = ("mlp", "block", "odd")


def model_spec(zoo, name: str) -> ModelSpec:
    """A zoo model (shared; never changed) or a hand-written one (fresh)."""
    return hand_written(name) if name in HAND_WRITTEN else zoo.spec(name)


def runner(spec: ModelSpec):
    """``run(model)``: the model's main output on the spec's inputs."""
    return lambda model: first_tensor(model(*spec.example_inputs, **spec.example_kwargs))


def adapt(spec: ModelSpec, stages: list[list]) -> nn.Module:
    """Apply ``stages[0]``, perturb the adapters, then apply each later stage in turn."""
    model = apply_passes(spec.model, stages[0], spec.example_inputs, spec.example_kwargs or None)
    perturb(model)
    for stage in stages[1:]:
        model = apply_passes(model, stage)
    return model


def stages(kind: str, model: str) -> list[list]:
    """The passes of one round-trip case. The MLP has no attention, so its layers are
    named; the other models use the passes' structural defaults (roles)."""
    mlp = model == "mlp"
    lora = dict(pattern=["up", "down"]) if mlp else {}
    ia3 = dict(pattern=["up", "down"], feedforward="down") if mlp else {}
    two_lora = [LoRAPass(rank=4, alpha=8, name="a", **lora),
                LoRAPass(rank=2, alpha=4, use_rslora=True, dropout=0.1, name="b", **lora)]
    adapters = [LoRAPass(rank=4, alpha=8, **lora), IA3Pass(**ia3)]
    return {
        "lora": [two_lora],
        "ia3": [[IA3Pass(**ia3)]],
        "serial": [[SerialAdapterPass(bottleneck=8, **(dict(pattern="down") if mlp else {}))]],
        "parallel": [[ParallelAdapterPass(bottleneck=8, **(dict(pattern="up") if mlp else {}))]],
        "prefix": [[PrefixPass(length=3)]],
        "prefix_gated": [[PrefixPass(length=2, gate="zero", name="g")]],
        "prefix_ejected": [[PrefixPass(length=3, reparameterize=True)], [EjectPrefixPass()]],
        "merged": [adapters, [MergeLoRAPass(), MergeIA3Pass()]],
        "unmerged": [adapters, [MergeLoRAPass(), MergeIA3Pass()], [UnmergeIA3Pass()],
                     [UnmergeLoRAPass()]],
        # every kind at once: the roles of a transformers model are found once for all
        "all": [[*two_lora, IA3Pass(name="c"), SerialAdapterPass(bottleneck=8, name="s"),
                 PrefixPass(length=3, name="x")]],
    }[kind]


CASES = [
    *[("builtin", k) for k in ("lora", "ia3", "serial", "parallel", "prefix", "prefix_gated",
                              "prefix_ejected", "merged", "unmerged")],
    *[("block", k) for k in ("lora", "ia3", "serial", "parallel", "merged")],
    *[("mlp", k) for k in ("lora", "ia3", "serial", "parallel", "merged", "unmerged")],
    # a parallel adapter's feed-forward sub-layers need the whole map: on LLaMA only
    *[("hf:llama", k) for k in ("all", "parallel", "prefix_gated", "unmerged")],
    *[("hf:gpt2", k) for k in ("all", "merged")],  # Conv1D: weights stored (in, out)
    *[("hf:bert", k) for k in ("all", "merged")],
]

# Fast settings for the tests that are not about selection: layers named, no map needed.
QV = ["q_proj", "v_proj"]


@pytest.mark.parametrize(("model", "kind"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_round_trip_is_bitwise(zoo, snapshot, tmp_path, model: str, kind: str) -> None:
    spec = model_spec(zoo, model)
    run = runner(spec)
    saved = adapt(spec, stages(kind, model))
    with torch.no_grad():
        assert not torch.equal(run(saved), run(spec.model))  # the adapters matter
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert_loaded_like(saved, loaded, spec.model, run)
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    assert sorted(load_file(tmp_path / TENSORS_FILE)) == sorted(adapter_keys(saved))
    assert [s["pass"] for s in recipe["steps"]] == [
        p.name for stage in stages(kind, model) for p in stage]
    if kind in ("merged", "unmerged"):
        merged = sorted(merged_adapters(saved))
        assert bool(merged) is (kind == "merged")
        assert recipe["adapters"]["default"]["merged"] == merged
    if kind in ("ia3", "all"):  # the feed-forward output layers scale their input
        modes = {m.mode for m in loaded.modules() if isinstance(m, IA3Vector)}
        assert modes == {"input", "output"}


def test_lora_dropout_is_restored(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, dropout=0.1)]])
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    saved.train(), loaded.train()
    outs = []
    for model in (saved, loaded):
        torch.manual_seed(7)  # the same dropout masks for both
        outs.append(runner(spec)(model))
    torch.manual_seed(8)
    other = runner(spec)(saved)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], other)


def test_active_and_trainable_state(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, name="a"),
                          IA3Pass(pattern="k_proj", name="b"),
                          LoRAPass(pattern=QV, rank=2, name="c")]])
    set_active(saved, ["a", "c"])
    set_trainable(saved, ["b"])
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert active_adapters(loaded) == ["a", "c"]
    assert trainable(loaded) == [f"layers.{i}.attn.k_proj.ia3_l.b" for i in range(2)]
    assert_loaded_like(saved, loaded, spec.model, runner(spec))

    set_active(saved, [])  # every adapter off: the base, bit for bit
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert active_adapters(loaded) == []
    assert_loaded_like(saved, loaded, spec.model, runner(spec))


def test_combined_adapter(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    two = adapt(spec, [[LoRAPass(pattern=QV, rank=4, alpha=8, name="a"),
                        LoRAPass(pattern=QV, rank=4, alpha=4, name="b")]])
    saved = combine_adapters(two, {"a": 0.7, "b": -0.3}, method="cat", name="ab")
    perturb(saved, seed=1)  # trained after combining: the file's values, not a recomputation
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert active_adapters(loaded) == ["ab"]
    assert_loaded_like(saved, loaded, spec.model, runner(spec))

    sources = load_checked(spec.model, tmp_path, snapshot, names=["a", "b"])
    assert set(adapter_keys(sources)) == {k for k in adapter_keys(saved) if ".ab." not in k}
    assert active_adapters(sources) == []  # as they were when saved: switched off by combine


def test_merged_in_place(tmp_path, snapshot) -> None:
    owned = load_model("builtin").model  # an in-place merge writes into this model's weights
    spec = load_model("builtin")
    model = apply_passes(owned, [LoRAPass(pattern=QV, rank=4), IA3Pass(pattern="k_proj")])
    perturb(model)
    saved = apply_passes(model, [MergeLoRAPass(inplace=True)], inplace=True)
    save_adapters(saved, tmp_path)
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    assert recipe["steps"][-1]["config"]["inplace"] is True
    loaded = load_checked(spec.model, tmp_path, snapshot)  # replayed into new tensors
    assert merged_adapters(loaded) == merged_adapters(saved)
    with torch.no_grad():
        assert torch.equal(runner(spec)(loaded), runner(spec)(saved))
    back = apply_passes(loaded, [UnmergeLoRAPass()])
    assert torch.equal(back.layers[0].attn.q_proj.weight, spec.model.layers[0].attn.q_proj.weight)


def test_named_subsets_with_prefix_names(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, name="a"),
                          LoRAPass(pattern=QV, rank=2, name="ab"),
                          IA3Pass(pattern=["v_proj", "down_proj"], feedforward="down_proj",
                                  name="a_b")]])
    save_adapters(saved, tmp_path)
    all_of_them = load_checked(spec.model, tmp_path, snapshot)
    assert_loaded_like(saved, all_of_them, spec.model, runner(spec))
    for names in (["a"], ["ab"], ["a_b"], ["a", "a_b"], "ab"):
        chosen = [names] if isinstance(names, str) else names
        loaded = load_checked(spec.model, tmp_path, snapshot, names=names)
        assert active_adapters(loaded) == chosen
        keys = {k for k in adapter_keys(saved) if set(k.split(".")) & set(chosen)}
        assert adapter_keys(loaded) == keys
        state = saved.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        reference = apply_passes(saved, [])  # the saved model with only these switched on
        set_active(reference, chosen)
        with torch.no_grad():
            assert torch.equal(runner(spec)(loaded), runner(spec)(reference))


def test_module_names_holding_weight_lora_base(snapshot, tmp_path) -> None:
    spec = hand_written("odd")
    saved = adapt(spec, [[
        LoRAPass(pattern=["weight", "lora", "base.0", "lora_A"], rank=2, name="weight"),
        LoRAPass(pattern=["weight", "lora"], rank=2, name="lora"),
        IA3Pass(pattern=["lora", "base.0"], feedforward=[], name="base")]])
    assert "weight.lora_A.weight.weight" in saved.state_dict()
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert_loaded_like(saved, loaded, spec.model, runner(spec))
    only = load_checked(spec.model, tmp_path, snapshot, names=["lora"])
    assert adapter_keys(only) == {k for k in adapter_keys(saved) if k.endswith(".lora.weight")}


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models(zoo, snapshot, tmp_path, wrap: str) -> None:
    def wrapped(model: nn.Module) -> nn.Module:
        if wrap == "compile":
            return torch.compile(model, backend="eager")
        return nn.DataParallel(model)  # a ``module.`` wrapper, as DDP, on the CPU

    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, dropout=0.1)]])
    save_adapters(saved, tmp_path / "bare")
    save_adapters(wrapped(saved), tmp_path / "wrapped")
    bare, other = (load_file(tmp_path / d / TENSORS_FILE) for d in ("bare", "wrapped"))
    assert list(other) == list(bare) and all(torch.equal(other[k], bare[k]) for k in bare)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in other)
    loaded = load_checked(wrapped(spec.model), tmp_path / "wrapped", snapshot)
    assert_loaded_like(saved, loaded, spec.model, runner(spec))


def test_adapter_stack(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, name="a"), IA3Pass(pattern=QV, name="b"),
                          SerialAdapterPass(pattern="mlp", bottleneck=8, name="c")]])
    stack = AdapterStack(saved, names=["a", "b", "c"])
    save_adapters(stack, tmp_path / "stack")
    save_adapters(stack.model, tmp_path / "model")
    for name in (TENSORS_FILE, RECIPE_FILE):
        assert (tmp_path / "stack" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    loaded = load_checked(spec.model, tmp_path / "stack", snapshot)
    assert_loaded_like(saved, loaded, spec.model, runner(spec))
    again = AdapterStack(loaded, names=list(stack.names))
    ids = torch.tensor([2, 0])
    with torch.no_grad():
        assert torch.equal(again(*spec.example_inputs, adapter_id=ids),
                           stack(*spec.example_inputs, adapter_id=ids))
        assert torch.equal(again(*spec.example_inputs, adapter_id="b"),
                           stack(*spec.example_inputs, adapter_id="b"))


def test_dtypes_are_kept_unless_asked(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    bf16 = ModelSpec("bf16", load_model("builtin").model.to(torch.bfloat16), spec.example_inputs)
    saved = adapt(bf16, [[LoRAPass(pattern=QV, rank=4), IA3Pass(pattern="k_proj")]])
    save_adapters(saved, tmp_path)
    assert {v.dtype for v in load_file(tmp_path / TENSORS_FILE).values()} == {torch.bfloat16}
    # onto a bf16 base: the saved model again, bitwise
    assert_loaded_like(saved, load_checked(bf16.model, tmp_path, snapshot), bf16.model,
                       runner(spec))
    # onto the float32 base without a cast: bfloat16 adapters could not run there
    with pytest.raises(CheckpointError, match=r"another dtype than the layers they adapt.*"
                                              r"dtype=torch.float32"):
        surgery.load_adapters(spec.model, tmp_path)
    # dtype= casts them: the values of the file, in float32
    cast = load_checked(spec.model, tmp_path, snapshot, dtype=torch.float32)
    for key in adapter_keys(saved):
        value = cast.state_dict()[key]
        assert value.dtype == torch.float32 and torch.equal(value, saved.state_dict()[key].float())
    reference = apply_passes(spec.model, [LoRAPass(pattern=QV, rank=4), IA3Pass(pattern="k_proj")])
    reference.load_state_dict({k: saved.state_dict()[k].float() for k in adapter_keys(saved)},
                              strict=False)
    with torch.no_grad():
        assert torch.equal(runner(spec)(cast), runner(spec)(reference))


def test_save_of_a_loaded_model_is_the_same_checkpoint(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, name="a"), IA3Pass(pattern=QV, name="b")],
                         [MergeLoRAPass(), MergeIA3Pass()], [UnmergeIA3Pass()]])
    save_adapters(saved, tmp_path / "first")
    save_adapters(load_checked(spec.model, tmp_path / "first", snapshot), tmp_path / "second")
    for name in (TENSORS_FILE, RECIPE_FILE):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_selection_by_role_replays_from_the_stored_example_inputs(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("hf:llama")  # transformers: roles need the map, traced by torch.export
    saved = adapt(spec, [[LoRAPass(rank=4), IA3Pass()]])
    save_adapters(saved, tmp_path)
    stored = load_file(tmp_path / INPUTS_FILE)
    assert torch.equal(stored["args.0"], spec.example_inputs[0])
    assert torch.equal(stored["kwargs.attention_mask"], spec.example_kwargs["attention_mask"])
    loaded = load_checked(spec.model, tmp_path, snapshot)  # no example_inputs given
    assert_loaded_like(saved, loaded, spec.model, runner(spec))
    sites = json.loads((tmp_path / RECIPE_FILE).read_text())["adapters"]["default"]["sites"]
    assert sites == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))

    # traced by torch.fx, no inputs given: none stored (and an earlier file goes)
    save_adapters(apply_passes(zoo.spec("builtin").model, [LoRAPass(rank=2)]), tmp_path)
    assert not (tmp_path / INPUTS_FILE).exists()
    assert json.loads((tmp_path / RECIPE_FILE).read_text())["example_inputs"] is None


def test_lora_rank_for_and_alpha_for(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("hf:gpt2")
    saved = adapt(spec, [[LoRAPass(pattern="c_attn", rank=4, rank_for={"h.0.**": 2},
                                   alpha_for=[("h.1.**", 32.0)])]])
    assert saved.transformer.h[0].attn.c_attn.lora_A["default"].weight.shape[0] == 2
    save_adapters(saved, tmp_path)
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert_loaded_like(saved, loaded, spec.model, runner(spec))
    assert loaded.transformer.h[1].attn.c_attn.lora_B["default"].scaling == 8.0


def test_train_module_keeps_gpt2_tie(zoo, snapshot, tmp_path) -> None:
    train_module = pytest.importorskip("passes.train_module")
    spec = zoo.spec("hf:gpt2")
    saved = adapt(spec, [[LoRAPass(pattern="c_attn", rank=4),
                          train_module.TrainModulePass(pattern="transformer.wte")]])
    assert saved.lm_head.weight is saved.transformer.wte.weight
    assert not torch.equal(saved.transformer.wte.weight, spec.model.transformer.wte.weight)
    save_adapters(saved, tmp_path)
    stored = load_file(tmp_path / TENSORS_FILE)
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored  # stored once
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    assert recipe["tensors"]["transformer.wte.weight"]["ties"] == ["lm_head.weight"]
    assert recipe["trained_modules"] == ["transformer.wte"]
    loaded = load_checked(spec.model, tmp_path, snapshot)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # loaded tied
    assert loaded.transformer.wte.weight.requires_grad
    assert_loaded_like(saved, loaded, spec.model, runner(spec))


def test_unsaved_trainable_base_parameters_warn(zoo, tmp_path) -> None:
    spec = zoo.spec("builtin")
    model = apply_passes(spec.model, [LoRAPass(pattern=QV, rank=2)], freeze=False)
    with pytest.warns(UserWarning, match=r"save_adapters: \d+ trainable base parameter\(s\) are "
                                         r"not saved \(\w+"):
        save_adapters(model, tmp_path)


def test_task_head_trained_fully_loads_without_warnings(snapshot, tmp_path) -> None:
    tf = pytest.importorskip("transformers")
    train_module = pytest.importorskip("passes.train_module")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4, intermediate_size=64, num_labels=3,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        base = tf.BertForSequenceClassification(config).eval()
    spec = ModelSpec("bert-cls", base, (torch.randint(0, 128, (2, 7),
                                                      generator=torch.Generator().manual_seed(1)),))
    saved = adapt(spec, [[LoRAPass(pattern=["query", "value"], rank=4),
                          train_module.TrainModulePass(pattern="classifier")]])
    save_adapters(saved, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaying LoRA before the head trains must not warn
        loaded = load_checked(base, tmp_path, snapshot)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable(loaded))
    assert_loaded_like(saved, loaded, base, runner(spec))


def test_load_onto_a_base_carrying_other_adapters(zoo, snapshot, tmp_path) -> None:
    spec = zoo.spec("builtin")
    saved = adapt(spec, [[LoRAPass(pattern=QV, rank=4, name="a"),
                          IA3Pass(pattern="k_proj", name="b")]])
    save_adapters(saved, tmp_path)
    other = adapt(spec, [[LoRAPass(pattern=["q_proj", "o_proj"], rank=2, name="other")]])
    loaded = load_checked(other, tmp_path, snapshot)
    assert active_adapters(loaded) == ["other", "a", "b"]
    state, before = loaded.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in before.items())
    set_active(loaded, ["a", "b"])  # "other" off: exactly the saved model
    with torch.no_grad():
        assert torch.equal(runner(spec)(loaded), runner(spec)(saved))

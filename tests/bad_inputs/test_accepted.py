"""Inputs that look wrong but are accepted on purpose, each as documented: a rank above a
layer's width (a warning), a prefix of length 0 (identity), float16 models, a model on the
meta device selected by name, example inputs that torch.fx does not need, adapter names
that equal a layer attribute, and a forward that raises when nothing needs tracing."""

from __future__ import annotations

import pytest
import torch
from bad_inputs.models import HIDDEN, IDS, attn, broken, on_meta, shape_checked
from surgery import (
    IA3Pass,
    LoRAPass,
    MergeLoRAPass,
    PrefixPass,
    SerialAdapterPass,
    apply_passes,
    history,
    set_active,
    trainable_parameters,
)
from surgery.zoo import load_model


def test_rank_above_width_warns_and_adapts(snapshot) -> None:
    """PEFT accepts such a rank silently; here it is a warning (surgery/sites/features.py
    ``warn_rank_exceeds``): ``B A`` cannot exceed rank 8 on an 8 -> 32 layer, so the extra
    rank only adds parameters, but the adapter is still correct (identity at init)."""
    model = attn()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"LoRAPass: rank 64 is larger than min\(in_features, "
                                         r"out_features\) of up \(Linear, 8 -> 32\).*Way out"):
        adapted = apply_passes(model, [LoRAPass(pattern="up", rank=64)])
    before.assert_unchanged(model)
    assert adapted.up.lora_A["default"].weight.shape == (64, 8)
    assert torch.equal(adapted(HIDDEN), model(HIDDEN))


def test_prefix_length_0_is_identity(snapshot) -> None:
    """``PrefixPass(length=0)`` is documented as leaving outputs bitwise unchanged."""
    spec = load_model("builtin:tiny")
    before = snapshot(spec.model)
    adapted = apply_passes(spec.model, [PrefixPass(length=0)], example_inputs=spec.example_inputs)
    before.assert_unchanged(spec.model)
    assert torch.equal(adapted(*spec.example_inputs), spec.model(*spec.example_inputs))


@pytest.mark.parametrize("passes", [
    [LoRAPass(pattern=["q_proj", "v_proj"])],
    [IA3Pass()],
    [SerialAdapterPass(pattern="o_proj", bottleneck=4)],
], ids=["lora", "ia3", "serial"])
def test_float16_model_adapts_in_float16(passes: list, snapshot) -> None:
    """float16 weights work: adapters take the layer's dtype and the outputs stay bitwise
    equal at init (DESIGN.md invariant 3)."""
    model = attn().half()
    x = HIDDEN.half()
    before = snapshot(model)
    adapted = apply_passes(model, passes)
    before.assert_unchanged(model)
    assert {p.dtype for p in trainable_parameters(adapted)} == {torch.float16}
    assert torch.equal(adapted(x), model(x))


def test_float16_merge_writes_new_tensors(snapshot) -> None:
    """A merge on float16 weights writes new tensors: the model given keeps its values."""
    model = attn().half()
    adapted = apply_passes(model, [LoRAPass(pattern="q_proj")])
    before = snapshot(adapted)
    merged = apply_passes(adapted, [MergeLoRAPass()])
    before.assert_unchanged(adapted)
    assert merged.q_proj.weight.dtype == torch.float16


def test_meta_model_adapts_by_name() -> None:
    """Selection by name reads names and types only, so a meta-device model adapts; its
    adapter tensors are on meta too (saving them is refused: see the checkpoint cases)."""
    model = on_meta()
    adapted = apply_passes(model, [LoRAPass(pattern="fc1")])
    assert all(p.is_meta for p in trainable_parameters(adapted))
    assert len(trainable_parameters(adapted)) == 2
    assert all(p.is_meta and p.requires_grad for p in model.parameters())  # left alone


def test_example_inputs_unused_when_fx_traces(snapshot) -> None:
    """Example inputs are needed only where torch.fx cannot trace the model; on a model it
    traces they are not run, so wrong ones do not matter (the map is the same)."""
    model = attn()
    before = snapshot(model)
    good = apply_passes(model, [IA3Pass()])
    odd = apply_passes(model, [IA3Pass()], example_inputs=(torch.zeros(1, 2, 5),))
    before.assert_unchanged(model)
    assert history(odd)[0].sites == history(good)[0].sites == ["k_proj", "v_proj", "down"]


def test_the_same_inputs_work_where_export_needs_them() -> None:
    """The model that needs torch.export adapts with matching inputs."""
    adapted = apply_passes(shape_checked(), [IA3Pass()], example_inputs=(HIDDEN,))
    assert history(adapted)[0].sites == ["k_proj", "v_proj", "down"]


def test_example_inputs_of_another_dtype_give_the_same_map() -> None:
    """The map is traced by torch.export on a weight-free (meta-device) copy, whose kernels
    do not compare dtypes, so int64 inputs to a float32 model trace; roles are structural,
    so the sites are the ones matching inputs give. (A shape the forward checks, a missing
    or extra argument, or an unknown keyword is a TraceError: see test_apply.py.)"""
    adapted = apply_passes(shape_checked(), [IA3Pass()], example_inputs=(HIDDEN.long(),))
    assert history(adapted)[0].sites == ["k_proj", "v_proj", "down"]


@pytest.mark.parametrize("name", ["base", "weight", "q_proj"])
def test_adapter_name_equal_to_a_layer_attribute(name: str) -> None:
    """Adapter modules live in an ``nn.ModuleDict`` per slot, so a name that is also an
    attribute of the layer (``weight``) or of the model (``q_proj``) cannot clash; only the
    attributes of ``nn.ModuleDict`` itself are refused (see the name cases)."""
    model = attn()
    adapted = apply_passes(model, [LoRAPass(pattern="q_proj", name=name)])
    keys = set(adapted.state_dict()) - set(model.state_dict())
    assert keys == {f"q_proj.lora_A.{name}.weight", f"q_proj.lora_B.{name}.weight"}
    assert torch.equal(adapted(HIDDEN), model(HIDDEN))


def test_forward_that_raises_is_not_run_for_selection_by_name() -> None:
    """Selection by name needs no tracing, so a model whose forward fails still adapts."""
    adapted = apply_passes(broken(), [LoRAPass(pattern="fc1")], example_inputs=(IDS,))
    assert history(adapted)[0].sites == ["fc1"]


def test_set_active_empty_list_switches_every_adapter_off() -> None:
    """``set_active(model, [])`` is documented: every adapter off, outputs as the base's."""
    model = attn()
    adapted = apply_passes(model, [LoRAPass(pattern="q_proj")])
    with torch.no_grad():
        adapted.q_proj.lora_B["default"].weight.fill_(0.5)  # as if trained
    assert not torch.equal(adapted(HIDDEN), model(HIDDEN))
    off = set_active(adapted, [])
    assert torch.equal(off(HIDDEN), model(HIDDEN))

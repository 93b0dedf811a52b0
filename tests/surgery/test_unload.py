"""``surgery.adapters.unload``: merge-and-unload back to the original class (``surgery/unload.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import projection_roles, randomize_adapters
from passes.merge import MergeIA3Pass, MergeLoRAPass
from surgery import AdapterModule, ConfigError, IA3Pass, LoRAPass, MergeError, apply_passes
from surgery.adapters.unload import unload

TABLE = ["builtin:tiny", "hf:gpt2", "hf:llama", "hf:bert"]


def fresh_instance(spec) -> nn.Module:
    """A new, randomly initialised instance of the class of the zoo model."""
    cls = type(spec.model)
    return cls(spec.model.config).eval()


@pytest.mark.parametrize("name", TABLE)
def test_unload_loads_strictly_into_the_original_class_and_matches(zoo, run_model, snapshot,
                                                                    name: str) -> None:
    spec = zoo.spec(name)
    traced = zoo.traced(name)
    adapted = apply_passes(traced, [LoRAPass(role=projection_roles(traced), rank=4, alpha=8),
                                    IA3Pass()])
    randomize_adapters(adapted)
    caller, given = snapshot(spec.model), snapshot(adapted)
    plain = unload(adapted)

    given.assert_unchanged(adapted)
    caller.assert_unchanged(spec.model)
    assert type(plain) is type(spec.model) is adapted._surgery.source_class
    assert not any(isinstance(m, AdapterModule) for m in plain.modules())
    assert list(plain.state_dict()) == list(spec.model.state_dict())
    assert plain.training == adapted.training

    y_plain = run_model(plain, spec)
    y_adapted = run_model(adapted, spec)
    assert (y_plain - y_adapted).abs().max() <= 1e-5 * (1 + y_adapted.abs().max())

    fresh = fresh_instance(spec)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(run_model(fresh, spec), y_plain)

    apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()], inplace=True)
    assert torch.equal(run_model(adapted, spec), y_plain)  # the merge passes' exact arithmetic


def test_unload_shares_unmerged_weights_and_keeps_merged_ones(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(zoo.traced("builtin:tiny"), [LoRAPass(rank=4)])
    randomize_adapters(adapted)
    merged_q = apply_passes(adapted, [MergeLoRAPass()])
    plain = unload(adapted)
    caller = dict(spec.model.named_parameters())
    for pname, param in plain.named_parameters():
        if pname.endswith(("q_proj.weight", "v_proj.weight")):
            assert param.data_ptr() != caller[pname].data_ptr()
            assert torch.equal(param, merged_q.get_submodule(pname[:-7]).weight)
        else:
            assert param.data_ptr() == caller[pname].data_ptr(), pname  # no copy
        assert param.requires_grad == caller[pname].requires_grad
    # already merged adapters stay folded: unloading the merged model gives the same weights
    again = unload(merged_q)
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


class _Gate(AdapterModule):
    """An adapter that is neither LoRA nor IA³."""

    pass_name = "prefix"


def test_unload_refuses_adapters_it_cannot_merge(zoo) -> None:
    adapted = apply_passes(zoo.traced("builtin:tiny"), [LoRAPass(rank=4)])
    adapted.get_submodule("layers.0.attn").add_module(
        "gate", _Gate(site="layers.0.attn", adapter_name="p"))
    with pytest.raises(MergeError, match=r"unload: adapter 'p' \(prefix\) cannot be merged: it is "
                                         r"not linear in the base weights"):
        unload(adapted)


def test_unload_needs_a_traced_model(zoo) -> None:
    with pytest.raises(ConfigError, match="unload takes a model from surgery.apply_passes"):
        unload(zoo.spec("builtin:tiny").model)


def test_unload_refuses_non_finite_weights(zoo) -> None:
    adapted = apply_passes(zoo.traced("builtin:tiny"), [LoRAPass(rank=4)])
    with torch.no_grad():
        adapted.get_submodule("layers.1.attn.v_proj.lora_B.default").weight.fill_(float("nan"))
    with pytest.raises(MergeError, match=r"layers\.1\.attn\.v_proj gives non-finite values"):
        unload(adapted)

"""``surgery.unload``: merge-and-unload back to the user's class (``surgery/adapters/unload.py``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import randomize_adapters
from torch import nn

from passes.merge import MergeIA3Pass, MergeLoRAPass
from surgery import (
    AdapterModule,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    SiteGraph,
    apply_passes,
    set_active,
)
from surgery.adapters.unload import unload

TABLE = ["builtin:tiny", "hf:gpt2", "hf:llama", "hf:bert"]
PASSES = {  # LoRA on every projection, IA³ with output and input scaling; by name, no map
    "builtin:tiny": (r"re:.*_proj", ["k_proj", "v_proj", "down_proj"], "down_proj"),
    "hf:gpt2": (["c_attn", "c_proj", "c_fc"], ["c_attn", "mlp.c_proj"], "mlp.c_proj"),
    "hf:llama": (r"re:.*_proj", ["k_proj", "v_proj", "down_proj"], "down_proj"),
    "hf:bert": (["query", "key", "value", "dense"], ["key", "value", "output.dense"],
                "layer.*.output.dense"),
}


def adapted_model(spec, name: str) -> nn.Module:
    lora, ia3, feedforward = PASSES[name]
    model = apply_passes(spec.model, [LoRAPass(pattern=lora, rank=4, alpha=8),
                                      IA3Pass(pattern=ia3, feedforward=feedforward)])
    randomize_adapters(model)
    return model


def fresh_instance(spec) -> nn.Module:
    """A new, randomly initialised instance of the class of the zoo model."""
    cls = type(spec.model)
    return cls(spec.model.config).eval()


@pytest.mark.parametrize("name", TABLE)
def test_unload_loads_strictly_into_the_original_class_and_matches(zoo, run_model, snapshot,
                                                                    name: str) -> None:
    spec = zoo.spec(name)
    adapted = adapted_model(spec, name)
    caller, given = snapshot(spec.model), snapshot(adapted)
    plain = unload(adapted)

    given.assert_unchanged(adapted)
    caller.assert_unchanged(spec.model)
    assert type(plain) is type(spec.model) is adapted._surgery.source_class
    assert not any(isinstance(m, (AdapterModule, SiteGraph)) for m in plain.modules())
    assert not hasattr(plain, "_surgery")
    assert list(plain.state_dict()) == list(spec.model.state_dict())
    assert plain.training == adapted.training

    y_plain = run_model(plain, spec)
    y_adapted = run_model(adapted, spec)
    assert (y_plain - y_adapted).abs().max() <= 1e-5 * (1 + y_adapted.abs().max())

    fresh = fresh_instance(spec)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(run_model(fresh, spec), y_plain)

    merged = apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()])
    assert torch.equal(run_model(merged, spec), y_plain)  # the merge passes' exact arithmetic

    if name in ("hf:gpt2", "hf:llama"):  # a transformers LM stays one: generate works
        ids = spec.example_inputs[0][:1, :4]
        out = plain.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8)
        assert torch.equal(out, merged.generate(ids, max_new_tokens=4, do_sample=False))


def test_unload_shares_unmerged_weights_and_keeps_merged_ones(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=4)])
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


@pytest.mark.parametrize("via", ["deepcopy", "pickle"])
def test_unload_of_a_copied_model(zoo, run_model, via: str) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = adapted_model(spec, "builtin:tiny")
    half = apply_passes(adapted, [MergeLoRAPass()])  # some merged, some not
    copied = copy.deepcopy(half) if via == "deepcopy" else pickle.loads(pickle.dumps(half))
    want, got = unload(half), unload(copied)
    assert type(got) is type(spec.model)
    for (n1, p1), (n2, p2) in zip(want.named_parameters(), got.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(run_model(got, spec), run_model(want, spec))


def test_switched_off_adapters_contribute_nothing(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=4, name="a"), IA3Pass(name="b")])
    randomize_adapters(adapted)
    set_active(adapted, "b")
    plain = unload(adapted)
    k = plain.get_submodule("layers.0.attn.k_proj")
    assert not torch.equal(k.weight, spec.model.get_submodule("layers.0.attn.k_proj").weight)
    q_name = "layers.0.attn.q_proj.weight"  # LoRA 'a' only: switched off, nothing folded
    assert plain.get_parameter(q_name).data_ptr() == spec.model.get_parameter(q_name).data_ptr()
    set_active(adapted, [])
    for (n, p), q in zip(unload(adapted).named_parameters(), spec.model.parameters()):
        assert p.data_ptr() == q.data_ptr() and torch.equal(p, q), n


class _Gate(AdapterModule):
    """An adapter that is neither LoRA nor IA³."""

    pass_name = "prefix"


def test_unload_refuses_adapters_it_cannot_merge(zoo, snapshot) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(rank=4)])
    adapted.get_submodule("layers.0.attn").add_module(
        "gate", _Gate(site="layers.0.attn", adapter_name="p"))
    before = snapshot(adapted)
    with pytest.raises(MergeError, match=r"unload: adapter 'p' \(prefix\) cannot be merged: it is "
                                         r"not linear in the base weights"):
        unload(adapted)
    before.assert_unchanged(adapted)


def test_unload_refuses_a_bottleneck_adapter(zoo) -> None:
    from surgery import SerialAdapterPass

    adapted = apply_passes(zoo.spec("builtin:tiny").model,
                           [LoRAPass(rank=4), SerialAdapterPass(pattern="layers.0.mlp.down_proj",
                                                                name="bn")])
    with pytest.raises(MergeError, match=r"unload: adapter 'bn' \(\w+\) cannot be merged"):
        unload(adapted)


def test_unload_needs_an_adapted_model(zoo) -> None:
    with pytest.raises(ConfigError, match="unload takes a model from surgery.apply_passes"):
        unload(zoo.spec("builtin:tiny").model)


def test_unload_refuses_non_finite_weights(zoo) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(rank=4)])
    with torch.no_grad():
        adapted.get_submodule("layers.1.attn.v_proj.lora_B.default").weight.fill_(float("nan"))
    with pytest.raises(MergeError, match=r"layers\.1\.attn\.v_proj gives non-finite values"):
        unload(adapted)


class _Tied(nn.Module):
    """An embedding and an output head sharing one weight ``(10, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weights_stay_tied_or_the_fold_is_refused() -> None:
    torch.manual_seed(0)
    model = _Tied()
    ids = torch.randint(0, 10, (2, 5))
    adapted = apply_passes(model, [LoRAPass(pattern="mid", rank=2)])
    randomize_adapters(adapted)
    plain = unload(adapted)
    assert plain.head.weight is plain.emb.weight  # untouched tie kept
    assert list(plain.state_dict()) == list(model.state_dict())
    assert (plain(ids) - adapted(ids)).abs().max() <= 1e-6

    tied = apply_passes(model, [LoRAPass(pattern="head", rank=2)])
    randomize_adapters(tied)
    with pytest.raises(MergeError, match=r"unload: the weight folded at head is tied to "
                                         r"emb\.weight .*exclude=\['head'\]"):
        unload(tied)


def test_a_model_that_is_one_layer_unloads_to_that_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    adapted = apply_passes(layer, [LoRAPass(pattern="*", rank=2), IA3Pass(pattern="*")])
    randomize_adapters(adapted)
    plain = unload(adapted)
    assert type(plain) is nn.Linear
    x = torch.randn(3, 8)
    assert torch.equal(plain(x), apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()])(x))


def test_a_switched_off_adapter_that_cannot_fold_leaves_with_its_site(zoo) -> None:
    from surgery import MergeError, SerialAdapterPass, set_active, unload

    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(name="l"), SerialAdapterPass(name="s")])
    with pytest.raises(MergeError, match=r"adapter 's' \(serial_adapter\) cannot be merged"):
        unload(adapted)
    set_active(adapted, "l")
    plain = unload(adapted)
    assert type(plain) is type(spec.model)
    assert not any("adapter" in n or "lora" in n for n in plain.state_dict())
    assert set(plain.state_dict()) == set(spec.model.state_dict())


def test_an_adapter_unload_cannot_merge_is_deleted_first(zoo, run_model) -> None:
    from surgery import SerialAdapterPass, delete_adapter

    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(name="s", rank=2),
                                        SerialAdapterPass(pattern="layers.0.mlp.down_proj",
                                                          name="m")])
    randomize_adapters(adapted)
    with pytest.raises(MergeError) as info:
        unload(adapted)
    msg = str(info.value)
    assert msg.startswith("unload: adapter 'm' (serial_adapter) cannot be merged: it is not linear")
    assert ("unload folds every adapter and takes no names. Way out: delete it first, model = "
            "surgery.delete_adapter(model, 'm'), then surgery.unload(model); or keep the "
            "adapted model as it is.") in msg
    assert "by name" not in msg
    without = delete_adapter(adapted, "m")
    plain = unload(without)
    assert type(plain) is type(spec.model)
    assert set(plain.state_dict()) == set(spec.model.state_dict())
    torch.testing.assert_close(run_model(plain, spec), run_model(without, spec),
                               rtol=1e-5, atol=1e-5)

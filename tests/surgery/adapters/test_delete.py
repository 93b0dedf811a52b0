"""``surgery.delete_adapter``: removing one named adapter of any kind
(``surgery/adapters/delete.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from attention_cases import hand_models
from torch import nn

from surgery import (
    AdapterModule,
    AdapterNotFoundError,
    IA3Pass,
    LoRAPass,
    MergeError,
    MergeLoRAPass,
    ParallelAdapterPass,
    Pass,
    PrefixPass,
    SerialAdapterPass,
    SiteGraph,
    UnmergeLoRAPass,
    UnsupportedSiteError,
    apply_passes,
    delete_adapter,
    history,
    load_adapters,
    save_adapters,
    set_active,
)
from surgery.checkpoint.registry import known_pass

KINDS: dict[str, Callable[[str], Pass]] = {
    "lora": lambda n: LoRAPass(rank=2, name=n),
    "ia3": lambda n: IA3Pass(name=n),
    "serial": lambda n: SerialAdapterPass(bottleneck=4, name=n),
    "parallel": lambda n: ParallelAdapterPass(bottleneck=4, name=n),
    "prefix": lambda n: PrefixPass(length=3, name=n),
}


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable parameter away from its initialisation (B = 0, ones, zero up
    projections and gates would make an adapter invisible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _run(model: nn.Module, spec: Any) -> torch.Tensor:
    out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    return out.logits if hasattr(out, "logits") else out


def _apply(spec: Any, passes: list[Pass]) -> nn.Module:
    return apply_passes(spec.model, passes, example_inputs=spec.example_inputs,
                        example_kwargs=spec.example_kwargs)


def _with_and_without(spec: Any, kind: str) -> tuple[nn.Module, nn.Module]:
    """``(LoRA "keep" + adapter "x" of ``kind``, trained), and the same base with "keep"
    only, holding the very values of the first model's "keep"."""
    full = _apply(spec, [LoRAPass(rank=4, name="keep"), KINDS[kind]("x")])
    _perturb(full, 0)
    ref = _apply(spec, [LoRAPass(rank=4, name="keep")])
    ref.load_state_dict({k: v for k, v in full.state_dict().items() if "x" not in k.split(".")},
                        strict=True)
    return full, ref


def _check_deleted(full: nn.Module, ref: nn.Module, spec: Any, snapshot: Any) -> nn.Module:
    before = snapshot(full)
    y_full = _run(full, spec)
    out = delete_adapter(full, "x")
    before.assert_unchanged(full)  # the caller's model: not a flag, value or node changed
    assert out is not full and type(out) is type(full)
    y_ref = _run(ref, spec)
    assert not torch.equal(y_full, y_ref)  # the adapter did contribute
    assert torch.equal(_run(out, spec), y_ref)  # bitwise the model adapted without it
    # its tensors left the state_dict; every other key is the one adapted without it
    assert sorted(out.state_dict()) == sorted(ref.state_dict())
    assert not [k for k in out.state_dict() if "x" in k.split(".")]
    assert [n for n, _ in out.named_modules()] == [n for n, _ in ref.named_modules()]
    assert not [m for m in out.modules()
                if isinstance(m, AdapterModule) and m.adapter_name == "x"]
    assert not [n for m in out.modules() if isinstance(m, SiteGraph) for n in m.graph.nodes
                if n.meta.get("surgery", {}).get("adapter") == "x"]
    # the other adapter: same values and flags as in the model given (its own copy, as
    # every model apply_passes returns); the base weights: the same storage
    kept = dict(full.named_parameters())
    adapters = {f"{q}.{n}" for q, m in out.named_modules() if isinstance(m, AdapterModule)
                for n, _ in m.named_parameters()}
    for name, p in out.named_parameters():
        assert torch.equal(p, kept[name]) and p.requires_grad == kept[name].requires_grad
        assert (p.data_ptr() == kept[name].data_ptr()) == (name not in adapters), name
    assert history(out)[-1].pass_name == "delete_adapter"
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_delete_on_the_builtin_model_equals_adapting_without_it(zoo, snapshot, kind: str) -> None:
    spec = zoo.spec("builtin:tiny")
    full, ref = _with_and_without(spec, kind)
    _check_deleted(full, ref, spec, snapshot)


@pytest.mark.parametrize("kind", list(KINDS))
def test_delete_on_a_transformers_llama_equals_adapting_without_it(zoo, snapshot,
                                                                   kind: str) -> None:
    spec = zoo.spec("hf:llama")
    full, ref = _with_and_without(spec, kind)
    _check_deleted(full, ref, spec, snapshot)


def test_a_site_left_without_adapters_stays_a_site_graph_computing_the_base(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=2, name="x")])
    _perturb(adapted, 0)
    out = delete_adapter(adapted, "x")
    sites = [n for n, m in out.named_modules() if isinstance(m, SiteGraph)]
    assert sites == [n for n, m in adapted.named_modules() if isinstance(m, SiteGraph)]
    assert not [m for m in out.modules() if isinstance(m, AdapterModule)]
    assert sorted(out.state_dict()) == sorted(spec.model.state_dict())
    assert torch.equal(_run(out, spec), _run(spec.model, spec))


def test_inplace_deletes_from_the_model_given(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=2, name="a"), IA3Pass(name="b")])
    set_active(adapted, ["a", "b"])
    out = delete_adapter(adapted, "b", inplace=True)
    assert out is adapted
    assert not [k for k in adapted.state_dict() if ".b." in f".{k}."]
    assert adapted._surgery.active == {"a"}


def test_a_merged_adapter_is_refused_naming_the_unmerge(zoo, snapshot) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=2, name="a"), LoRAPass(rank=2, name="x"),
                                        MergeLoRAPass(names=["x"])])
    before = snapshot(adapted)
    with pytest.raises(MergeError, match=r"'x' is merged .*UnmergeLoRAPass\(names=\['x'\]\)"):
        delete_adapter(adapted, "x")
    before.assert_unchanged(adapted)
    # the way out works
    out = delete_adapter(apply_passes(adapted, [UnmergeLoRAPass(names=["x"])]), "x")
    assert not [k for k in out.state_dict() if ".x." in f".{k}."]


def test_an_unknown_name_lists_the_nearest(zoo, snapshot) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(rank=2, name="sst2"), IA3Pass(name="mnli")])
    before = snapshot(adapted)
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'sst'.*'sst2', 'mnli'"):
        delete_adapter(adapted, "sst")
    before.assert_unchanged(adapted)


HAND = ("causal", "eager", "masked_bool", "mha")


class _Outer1(nn.Module):
    """A model holding one hand-written attention block (one input)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Outer2(_Outer1):
    """The same for a block taking an input and a mask."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.block(x, mask)


@pytest.mark.parametrize("which", HAND)
def test_a_prefix_woven_into_a_hand_written_attention_is_taken_out(snapshot, which: str) -> None:
    """The prefix rewrote the attention op's own arguments (keys, values, mask, is_causal):
    deleting it gives every argument back, so the result is the model adapted without it."""
    block, inputs = hand_models()[which]
    model = (_Outer1 if len(inputs) == 1 else _Outer2)(block).eval()
    spec = type("Spec", (), {"model": model, "example_inputs": inputs, "example_kwargs": None})
    lora = "block.o" if which != "mha" else "block.out"
    full = _apply(spec, [LoRAPass(pattern=lora, rank=2, name="keep"), PrefixPass(length=3,
                                                                                 name="x")])
    _perturb(full, 0)
    ref = _apply(spec, [LoRAPass(pattern=lora, rank=2, name="keep")])
    ref.load_state_dict({k: v for k, v in full.state_dict().items() if "x" not in k.split(".")})
    out = _check_deleted(full, ref, spec, snapshot)
    if which == "causal":  # the attention op is causal again, as before the prefix
        (sg,) = [m for m in out.modules() if isinstance(m, SiteGraph) and "scaled_dot" in m.code]
        assert "is_causal = True" in sg.code


def test_a_prefix_under_a_second_one_on_the_same_causal_op_is_refused(snapshot) -> None:
    block, (x,) = hand_models()["causal"]
    model = _Outer1(block).eval()
    adapted = apply_passes(model, [PrefixPass(length=2, name="low"), PrefixPass(length=2,
                                                                              name="top")],
                           example_inputs=(x,))
    before = snapshot(adapted)
    with pytest.raises(UnsupportedSiteError, match=r"delete_adapter: prefix 'low' at .*set_active"):
        delete_adapter(adapted, "low")
    before.assert_unchanged(adapted)
    # the prefix on top can go: the result is the model with "low" alone
    _perturb(adapted, 1)
    only_low = delete_adapter(adapted, "top")
    ref = apply_passes(model, [PrefixPass(length=2, name="low")], example_inputs=(x,))
    ref.load_state_dict({k: v for k, v in adapted.state_dict().items()
                         if "top" not in k.split(".")})
    assert torch.equal(only_low(x), ref(x))
    assert not torch.equal(adapted(x), ref(x))


@pytest.mark.parametrize("which", ["builtin:tiny", "hf:llama"])
def test_save_and_load_round_trip_after_delete(zoo, tmp_path, which: str) -> None:
    spec = zoo.spec(which)
    full = _apply(spec, [LoRAPass(rank=4, name="keep"), IA3Pass(name="x"),
                         SerialAdapterPass(bottleneck=4, name="y")])
    _perturb(full, 0)
    out = delete_adapter(full, "y")
    save_adapters(out, tmp_path)
    back = load_adapters(spec.model, tmp_path)
    assert torch.equal(_run(back, spec), _run(out, spec))
    assert sorted(back.state_dict()) == sorted(out.state_dict())


def test_an_adapter_deleted_then_added_again_saves_its_last_incarnation(zoo, tmp_path) -> None:
    spec = zoo.spec("builtin:tiny")
    first = apply_passes(spec.model, [LoRAPass(rank=4, name="keep"), LoRAPass(rank=2, name="x"),
                                      MergeLoRAPass(names=["x"]), UnmergeLoRAPass(names=["x"])])
    again = apply_passes(delete_adapter(first, "x"), [LoRAPass(rank=8, name="x")])
    _perturb(again, 1)
    save_adapters(again, tmp_path)
    recipe = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(s["pass"], s["config"].get("name")) for s in recipe["steps"]] == [
        ("lora", "keep"), ("lora", "x")]
    back = load_adapters(spec.model, tmp_path)
    assert torch.equal(_run(back, spec), _run(again, spec))
    # the deletion itself is a registered pass that rebuilds from its settings
    step = history(delete_adapter(first, "x"))[-1].step
    assert known_pass("delete_adapter").from_config(step.config()) == step

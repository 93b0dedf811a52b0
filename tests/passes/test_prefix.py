"""Tests of passes/prefix.py (with the prefix_* files): the math, masks, causality, the
zero-init gate, reparameterisation and eject, GQA, nn.MultiheadAttention; on hand-written
models (site graphs) and transformers models (the attention interface).
transformers-only behaviour (the KV cache, generate, pickling) is in test_prefix_hf.py, the
sequence form in test_prefix_sequence.py."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    Bare,
    BareGQA,
    MHAModel,
    hand_models,
    padding,
)
from prefix_cases import WithMixer
from torch import nn

from passes.prefix import (
    CHANGES_OUTPUTS,
    IDENTITY,
    EjectPrefixPass,
    PrefixPass,
    attention_owners,
)
from passes.prefix_masks import extend_sdpa_mask, prepend_columns
from passes.prefix_modules import AttentionPrefix, LearnedPrefix, MHAPrefix, PrefixGate
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    apply_passes,
    named_trainable_parameters,
    trace,
)
from surgery.sites.site_graph import SiteGraph, site_graphs
from surgery.zoo import TinyConfig, TinyTransformer

TOL = 1e-6  # float32 against a float64 hand computation, relative to the output's size


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL * max(1.0, want.abs().max().item()), f"error {err:.3g}"


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    with torch.no_grad():
        getattr(module, name).copy_(value)


def _prefix(model: nn.Module, owner: str, name: str = "default") -> LearnedPrefix:
    return model.get_submodule(f"{owner}.prefix.{name}" if owner else f"prefix.{name}")


def _result(adapted: nn.Module):
    return next(r for r in adapted._surgery.history if r.pass_name == "prefix")


@pytest.fixture(scope="module")
def hand() -> dict:
    """The hand-written models with inputs, seeded."""
    return hand_models()


# ---- the math ---------------------------------------------------------------------------------


def test_single_head_matches_hand_computation() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 8) for _ in range(3))
    adapted = apply_passes(Bare(), [PrefixPass(length=3)], example_inputs=(q, k, v))
    prefix = _prefix(adapted, "")
    assert isinstance(prefix, AttentionPrefix) and prefix.key.shape == (1, 3, 8)
    pk, pv = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    _set(prefix, "key", pk)
    _set(prefix, "value", pv)
    qd = q[0, 0].double()
    kk, vv = torch.cat([pk[0], k[0, 0]]).double(), torch.cat([pv[0], v[0, 0]]).double()
    want = torch.softmax(qd @ kk.T / math.sqrt(8), dim=-1) @ vv  # softmax([q·pk, q·k]) @ [pv; v]
    _close(adapted(q, k, v)[0, 0], want)


def test_zero_gate_math_and_gradients() -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    adapted = apply_passes(Bare(), [PrefixPass(length=3, gate="zero")], example_inputs=(q, k, v))
    adapted.train()
    gate = adapted.get_submodule("prefix_gate.default")
    assert isinstance(gate, PrefixGate) and torch.equal(gate.weight, torch.zeros(2))
    out = adapted(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)), "bitwise identity at init"
    out.pow(2).sum().backward()
    assert gate.weight.grad is not None
    assert gate.weight.grad.abs().min() > 0, "the gate learns at init"
    prefix = _prefix(adapted, "")
    assert prefix.key.grad is None or prefix.key.grad.abs().sum() == 0
    _set(gate, "weight", torch.tensor([0.5, -2.0]))
    adapted.zero_grad()
    out = adapted(q, k, v)
    g = gate.weight.detach().double().view(1, 2, 1, 1)
    pk, pv = prefix.key.detach().double(), prefix.value.detach().double()
    qd = q.double()
    side = torch.softmax(qd @ pk.transpose(-1, -2) / math.sqrt(8), dim=-1) @ pv  # its own softmax
    _close(out, F.scaled_dot_product_attention(qd, k.double(), v.double()) + g * side)
    out.pow(2).sum().backward()
    assert prefix.key.grad.abs().sum() > 0 and prefix.value.grad.abs().sum() > 0


def test_gqa_in_the_op_uses_key_value_heads() -> None:
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    adapted = apply_passes(BareGQA(), [PrefixPass(length=3)], example_inputs=(q, k, v))
    prefix = _prefix(adapted, "")
    assert prefix.key.shape == (2, 3, 8), "(kv heads, P, head_dim)"
    pk, pv = prefix.key.detach().expand(2, 2, 3, 8), prefix.value.detach().expand(2, 2, 3, 8)
    want = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
                                          enable_gqa=True)
    assert torch.equal(adapted(q, k, v), want)


def test_gqa_in_the_op_with_zero_gate() -> None:
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    adapted = apply_passes(BareGQA(), [PrefixPass(length=3, gate="zero")], example_inputs=(q, k, v))
    base = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(adapted(q, k, v), base)
    gate = adapted.get_submodule("prefix_gate.default")
    assert gate.weight.shape == (4,), "one gate per query head"
    _set(gate, "weight", torch.tensor([1.0, 0.0, -1.0, 0.5]))
    prefix = _prefix(adapted, "")
    pk, pv = prefix.key.detach().expand(2, 2, 3, 8), prefix.value.detach().expand(2, 2, 3, 8)
    side = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=True)
    _close(adapted(q, k, v), base + gate.weight.detach().view(1, 4, 1, 1) * side)


# ---- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (1, 1, 5, 6), (2, 1, 1, 6), (5, 6), (2, 4, 5, 1)])
def test_prepend_columns_bool_and_additive(shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    keep = torch.rand(shape) > 0.3
    ext = prepend_columns(keep, 3, 6, "keep")
    assert ext.shape == (*shape[:-1], 9) and ext.dtype == torch.bool
    assert ext[..., :3].all(), "prefix columns visible"
    assert torch.equal(ext[..., 3:], keep.expand(*shape[:-1], 6)), "original part unchanged"
    additive = torch.zeros(shape).masked_fill(~keep, float("-inf"))
    ext = prepend_columns(additive, 3, 6, "keep")
    assert torch.equal(ext[..., :3], torch.zeros(*shape[:-1], 3))
    assert torch.equal(ext[..., 3:], additive.expand(*shape[:-1], 6))
    drop = prepend_columns(~keep, 3, 6, "drop")
    assert not drop[..., :3].any() and torch.equal(drop[..., 3:], (~keep).expand(*shape[:-1], 6))
    assert prepend_columns(keep, 0, 6, "keep") is keep


def test_is_causal_becomes_explicit_mask_with_visible_prefix() -> None:
    q, k = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    mask = extend_sdpa_mask(None, torch.zeros(1, 1, 2, 2), k, q, True)
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, want)
    assert extend_sdpa_mask(None, torch.zeros(1, 1, 2, 2), k, q, False) is None


def test_is_causal_call_rewritten(hand) -> None:
    model, args = hand["causal"]
    adapted = apply_passes(model, [PrefixPass(length=2)], example_inputs=args)
    sdpa = next(n for n in adapted.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["is_causal"] is False
    assert sdpa.kwargs["attn_mask"].meta["surgery"]["part"] == "mask"
    prefix = _prefix(adapted, "")  # the model's own forward holds the op
    (x,) = args
    q, k, v = (model.split(x, m) for m in (model.q, model.k, model.v))
    pk, pv = prefix.key.detach().expand(2, 4, 2, 8), prefix.value.detach().expand(2, 4, 2, 8)
    ones = torch.ones(6, 8, dtype=torch.bool)
    mask = torch.cat([ones[:, :2], ones[:, 2:].tril()], 1)  # prefix visible, causal part intact
    want = model.merge(F.scaled_dot_product_attention(
        q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask))
    assert torch.equal(adapted(x), want)


def test_bool_and_additive_masks_give_the_same_result(hand) -> None:
    model, (x, keep) = hand["masked_bool"]
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    adapted = apply_passes(model, [PrefixPass(length=3)], example_inputs=(x, keep))
    _close(adapted(x, additive), adapted(x, keep))
    assert not torch.equal(adapted(x, keep), model(x, keep))


def test_eager_attention_zero_gate_math(hand) -> None:
    model, (x, additive) = hand["eager"]
    adapted = apply_passes(model, [PrefixPass(length=3, gate="zero")], example_inputs=(x, additive))
    gate = adapted.get_submodule("prefix_gate.default")
    assert gate.kind == "eager"
    _set(gate, "weight", torch.tensor([0.5, -1.0, 2.0, 0.0]))
    prefix = _prefix(adapted, "")
    q, k, v = (model.split(x, m) for m in (model.q, model.k, model.v))
    pk, pv = prefix.key.detach().expand(2, 4, 3, 8), prefix.value.detach().expand(2, 4, 3, 8)
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    side = F.scaled_dot_product_attention(q, pk, pv)  # its own softmax, same 1/sqrt(8) scale
    _close(adapted(x, additive), model.merge(base + gate.weight.detach().view(1, 4, 1, 1) * side))


def test_eager_attention_matches_sdpa_with_prefix(hand) -> None:
    model, (x, additive) = hand["eager"]
    adapted = apply_passes(model, [PrefixPass(length=3)], example_inputs=(x, additive))
    prefix = _prefix(adapted, "")
    assert prefix.key.shape == (4, 3, 8)
    q, k, v = (model.split(x, m) for m in (model.q, model.k, model.v))
    pk, pv = prefix.key.detach().expand(2, 4, 3, 8), prefix.value.detach().expand(2, 4, 3, 8)
    want = model.merge(F.scaled_dot_product_attention(
        q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
        attn_mask=torch.cat([torch.zeros(2, 1, 1, 3), additive], -1)))
    _close(adapted(x, additive), want)


# ---- identity: P = 0, the gate, inactive ------------------------------------------------------


HF = ["hf:gpt2", "hf:llama", "hf:bert", "hf:vit"]
HAND = ["causal", "eager", "masked_bool", "mha"]


def _base_and_adapted(zoo, run_model, hand, which: str, **kw):
    """``(base output, adapted model, run)`` for a hand-written model or a zoo model."""
    if which in hand:
        model, args = hand[which]
        adapted = apply_passes(model, [PrefixPass(**kw)], example_inputs=args)
        # nn.MultiheadAttention: PyTorch's matmul picks its kernel from requires_grad, so the
        # bitwise reference is the model with frozen weights, as in the adapted model.
        ref = apply_passes(model, []) if which == "mha" else model
        return ref(*args), adapted, lambda m: m(*args)
    spec = zoo.spec(which)
    adapted = apply_passes(spec.model, [PrefixPass(**kw)])
    with torch.no_grad():
        base = run_model(spec.model, spec)
    return base, adapted, lambda m: run_model(m, spec)


@pytest.mark.parametrize("which", ["builtin:tiny", *HAND, *HF])
def test_zero_length_equals_base(zoo, run_model, hand, which: str) -> None:
    base, adapted, run = _base_and_adapted(zoo, run_model, hand, which, length=0)
    with torch.no_grad():
        assert torch.equal(run(adapted), base)


@pytest.mark.parametrize("which", ["builtin:tiny", *HAND, *HF])
def test_zero_gate_identity_at_init_and_no_gate_changes_outputs(zoo, run_model, hand,
                                                              which: str) -> None:
    base, gated, run = _base_and_adapted(zoo, run_model, hand, which, length=3,
                                         gate="zero")
    with torch.no_grad():
        assert torch.equal(run(gated), base)
    assert all(c.detail.endswith(IDENTITY) for c in _result(gated).changes
               if c.kind in ("node_added", "param_added"))
    _, plain, _ = _base_and_adapted(zoo, run_model, hand, which, length=3)
    with torch.no_grad():
        assert not torch.equal(run(plain), base)
    details = [c.detail for c in _result(plain).changes if c.kind in ("node_added", "param_added")]
    assert details and all(d.endswith(CHANGES_OUTPUTS) for d in details)


@pytest.mark.parametrize("which", ["builtin:tiny", "mha", "eager", "hf:gpt2"])
@pytest.mark.parametrize("gate", [None, "zero"])
def test_inactive_prefix_gives_base_outputs(zoo, run_model, hand, which: str, gate) -> None:
    base, adapted, run = _base_and_adapted(zoo, run_model, hand, which, length=3, gate=gate)
    for mod in adapted.modules():
        if isinstance(mod, PrefixGate):
            _set(mod, "weight", torch.full_like(mod.weight, 0.5))
    with torch.no_grad():
        assert not torch.equal(run(adapted), base)
    for mod in adapted.modules():
        if isinstance(mod, (LearnedPrefix, PrefixGate)):
            mod.active = False
    with torch.no_grad():
        assert torch.equal(run(adapted), base)


# ---- padding and causality ----------------------------------------------------------------


def test_padding_ignored_tiny(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [PrefixPass(length=4)])
    ids = spec.example_inputs[0].clone()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    other = ids.clone()
    other[0, -2] = (ids[0, -2] + 7) % 256
    with torch.no_grad():
        a, b = adapted(ids, mask), adapted(other, mask)
    assert torch.equal(a[0, :-3], b[0, :-3]), "real positions ignore padded tokens"
    assert not torch.equal(a[0, -2], b[0, -2])


def test_padding_ignored_mha(hand) -> None:
    model, (x, pad) = hand["mha"]
    adapted = apply_passes(model, [PrefixPass(length=3)], example_inputs=(x, pad))
    prefix = _prefix(adapted, "attn")
    assert isinstance(prefix, MHAPrefix) and prefix.key.shape == (3, 32)
    other = x.clone()
    other[0, -1] += 3.0  # a padded position of sample 0
    with torch.no_grad():
        a, b = adapted(x, pad), adapted(other, pad)
    assert torch.equal(a[0, :-2], b[0, :-2]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("which", ["builtin:tiny", "causal", "hf:gpt2", "hf:llama"])
def test_causality_among_real_tokens(zoo, run_model, hand, which: str) -> None:
    if which in hand:
        model, (x,) = hand[which]
        adapted = apply_passes(model, [PrefixPass(length=3)], example_inputs=(x,))
        other = x.clone()
        other[:, -1] += 1.0
        run = adapted
        a, b = run(x), run(other)
    else:
        spec = zoo.spec(which)
        adapted = apply_passes(spec.model, [PrefixPass(length=3)])
        ids = spec.example_inputs[0]
        other = ids.clone()
        other[:, -1] = (ids[:, -1] + 1) % 128
        with torch.no_grad():
            a = run_model(adapted, spec, args=(ids,))
            b = run_model(adapted, spec, args=(other,))
    assert torch.equal(a[:, :-1], b[:, :-1]), "a later token does not reach earlier outputs"
    assert not torch.equal(a[:, -1], b[:, -1])


# ---- gradients, names, provenance -----------------------------------------------------------


@pytest.mark.parametrize("which,owner", [("builtin:tiny", "layers.{i}.attn"),
                                         ("hf:gpt2", "transformer.h.{i}.attn"),
                                         ("hf:bert", "encoder.layer.{i}.attention.self")])
def test_parameters_names_gradients_and_marks(zoo, run_model, which: str, owner: str) -> None:
    spec = zoo.spec(which)
    adapted = apply_passes(spec.model, [PrefixPass(length=2)])
    assert type(adapted) is type(spec.model)
    names = sorted(n for n, _ in named_trainable_parameters(adapted))
    assert names == sorted(f"{owner.format(i=i)}.prefix.default.{p}" for i in range(2)
                           for p in ("key", "value"))
    adapted.train()
    run_model(adapted, spec).pow(2).mean().backward()
    assert sorted(n for n, p in adapted.named_parameters() if p.grad is not None) == names
    for name, param in named_trainable_parameters(adapted):
        assert param.grad.abs().sum() > 0, name
    graphs = dict(site_graphs(adapted))
    if which.startswith("hf:"):  # the attention modules keep their class; no site graph
        assert graphs == {}
        added = [c.name for c in _result(adapted).changes if c.kind == "module_added"]
        assert added == [f"{owner.format(i=i)}.prefix.default" for i in range(2)]
        return
    assert sorted(graphs) == [owner.format(i=i) for i in range(2)]
    marked = [n for sg in graphs.values() for n in sg.graph.nodes if "surgery" in n.meta]
    parts = sorted(n.meta["surgery"]["part"] for n in marked)
    assert parts.count("cat_key") == parts.count("cat_value") == parts.count("prefix_key") == 2
    assert all(n.meta["surgery"]["pass"] == "prefix" and n.meta["surgery"]["adapter"] == "default"
               for n in marked)


def test_gradients_reach_the_reparameterisation_mlp(zoo, run_model) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model,
                           [PrefixPass(length=2, reparameterize=True, reparam_hidden=8)])
    names = {n for n, _ in named_trainable_parameters(adapted)}
    assert "layers.0.attn.prefix.default.encoder.mlp.0.weight" in names
    assert not any(n.endswith((".key", ".value")) for n in names)
    run_model(adapted, zoo.spec("builtin:tiny")).pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("which", ["builtin:tiny", "hf:gpt2"])
def test_eject_is_bitwise(zoo, run_model, which: str) -> None:
    spec = zoo.spec(which)
    adapted = apply_passes(spec.model,
                           [PrefixPass(length=3, reparameterize=True, reparam_hidden=8, gate=None)])
    with torch.no_grad():
        before = run_model(adapted, spec)
    ejected = apply_passes(adapted, [EjectPrefixPass()])
    with torch.no_grad():
        assert torch.equal(run_model(ejected, spec), before)
    names = {n for n, _ in named_trainable_parameters(ejected)}
    assert not any(".encoder." in n for n in names) and len(names) == 4
    for mod in adapted.modules():  # the pass left ``adapted`` alone; now eject it in place
        if isinstance(mod, LearnedPrefix):
            assert mod.encoder is not None
            mod.eject()
    with torch.no_grad():
        assert torch.equal(run_model(adapted, spec), before)
    with pytest.raises(NoMatchError, match="no reparameterised prefix"):
        apply_passes(ejected, [EjectPrefixPass()])


def test_mha_gate_identity_and_math(hand) -> None:
    model, (x, pad) = hand["mha"]
    adapted = apply_passes(model, [PrefixPass(length=3, gate="zero")], example_inputs=(x, pad))
    ref = apply_passes(model, [])
    assert torch.equal(adapted(x, pad), ref(x, pad))
    gate = adapted.get_submodule("attn.prefix_gate.default")
    _set(gate, "weight", torch.tensor([0.5, -1.0, 2.0, 0.25]))
    prefix = _prefix(adapted, "attn")
    mha = model.attn
    h = model.inp(x)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (4, 8)).transpose(-2, -3)

    side = F.scaled_dot_product_attention(heads(F.linear(h, wq, bq)),
                                          heads(F.linear(prefix.key, wk, bk)).expand(2, 4, 3, 8),
                                          heads(F.linear(prefix.value, wv, bv)).expand(2, 4, 3, 8))
    side = side * gate.weight.view(1, 4, 1, 1)
    want = mha(h, h, h, key_padding_mask=pad)[0] + F.linear(side.transpose(1, 2).flatten(-2),
                                                           mha.out_proj.weight)
    _close(adapted(x, pad), model.out(want))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_prefix_is_concatenated_to_key_and_value_inputs(batch_first: bool) -> None:
    torch.manual_seed(5)
    model = MHAModel(batch_first).eval()
    x = torch.randn(2, 6, 8) if batch_first else torch.randn(6, 2, 8)
    pad = padding()
    adapted = apply_passes(model, [PrefixPass(length=3)], example_inputs=(x, pad))
    prefix = _prefix(adapted, "attn")
    h = model.inp(x)
    pk, pv = prefix.key.detach(), prefix.value.detach()
    if batch_first:
        kin, vin = torch.cat([pk.expand(2, 3, 32), h], 1), torch.cat([pv.expand(2, 3, 32), h], 1)
    else:
        kin = torch.cat([pk[:, None].expand(3, 2, 32), h], 0)
        vin = torch.cat([pv[:, None].expand(3, 2, 32), h], 0)
    full_pad = torch.cat([torch.zeros(2, 3, dtype=torch.bool), pad], 1)
    frozen = copy.deepcopy(model).requires_grad_(False)
    want = frozen.out(frozen.attn(h, kin, vin, key_padding_mask=full_pad)[0])
    assert torch.equal(adapted(x, pad), want)


# ---- selection, errors, the caller, other sizes ------------------------------------------------


def test_selection_by_owner_name(zoo) -> None:
    plain = zoo.spec("builtin:tiny").model
    assert [o for o, _ in attention_owners(trace(plain))] == ["layers.0.attn", "layers.1.attn"]

    def owners(adapted: nn.Module) -> set[str]:
        return {n.rsplit(".", 3)[0] for n, _ in named_trainable_parameters(adapted)}

    one = apply_passes(plain, [PrefixPass(length=2, pattern="layers.0.attn")])
    assert owners(one) == {"layers.0.attn"}
    assert [q for q, _ in site_graphs(one)] == ["layers.0.attn"], "only the selected owner"
    assert owners(apply_passes(plain, [PrefixPass(length=2, exclude="layers.0.*")])) == {
        "layers.1.attn"}
    bert = apply_passes(zoo.spec("hf:bert").model, [PrefixPass(length=2, pattern="layer.1.**")])
    assert owners(bert) == {"encoder.layer.1.attention.self"}, "the module calling attention"


def test_errors(zoo) -> None:
    traced = zoo.spec("builtin:tiny").model
    with pytest.raises(NoMatchError, match="PrefixPass.*'self_attn'.*layers.0.attn"):
        apply_passes(traced, [PrefixPass(length=2, pattern="self_attn")])
    with pytest.raises(NoMatchError, match="no attention op"):
        apply_passes(WithMixer(), [PrefixPass(length=2)])
    assert PrefixPass(length=2, role="attention").role == "attention"
    for bad in (dict(length=-1), dict(length=2, gate="one"), dict(length=2, mode="tokens"),
                dict(length=2, role="query"), dict(length=2, mode="sequence")):
        with pytest.raises(ConfigError):
            PrefixPass(**bad)
    once = apply_passes(traced, [PrefixPass(length=2)])
    with pytest.raises(AlreadyAdaptedError, match="adapter named 'default' in slot 'prefix'"):
        apply_passes(once, [PrefixPass(length=2)])
    twice = apply_passes(once, [PrefixPass(length=1, name="other")])
    assert twice.get_submodule("layers.0.attn.prefix.other").key.shape == (4, 1, 16)


def test_composes_with_lora_and_ia3_in_either_order(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    alone = apply_passes(spec.model, [PrefixPass(length=2)])
    prefixes = {k: v for k, v in alone.state_dict().items() if ".prefix." in k}
    others = [LoRAPass(pattern=["q_proj", "v_proj"]), IA3Pass(pattern=["k_proj", "v_proj"])]
    for order in ([*others, PrefixPass(length=2)], [PrefixPass(length=2), *others]):
        adapted = apply_passes(spec.model, order)
        assert isinstance(adapted.layers[0].attn, SiteGraph)
        assert isinstance(adapted.layers[0].attn.q_proj, SiteGraph), "LoRA inside the holder"
        adapted.load_state_dict(prefixes, strict=False)
        with torch.no_grad():  # LoRA's B = 0 and IA3's ones: the prefix alone acts
            assert torch.equal(adapted(*spec.example_inputs), alone(*spec.example_inputs))
        adapted(*spec.example_inputs).pow(2).mean().backward()
        for name, param in named_trainable_parameters(adapted):
            assert param.grad is not None, name


@pytest.mark.parametrize("which,kw", [("builtin:tiny", dict()), ("mha", dict(gate="zero")),
                                      ("eager", dict(gate="zero")),
                                      ("builtin:tiny", dict(reparameterize=True,
                                                            reparam_hidden=8))])
def test_copies_and_pickles_keep_outputs(zoo, run_model, hand, which: str, kw: dict) -> None:
    _, adapted, run = _base_and_adapted(zoo, run_model, hand, which, length=3, **kw)
    for mod in adapted.modules():
        if isinstance(mod, PrefixGate):
            _set(mod, "weight", torch.full_like(mod.weight, 0.5))
    with torch.no_grad():
        want = run(adapted)
        for other in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
            assert torch.equal(run(other), want)
            marks = [n.meta["surgery"]["part"] for _, sg in site_graphs(other)
                     for n in sg.graph.nodes if "surgery" in n.meta]
            assert "prefix_key" in marks and "prefix_value" in marks


def test_caller_unchanged(zoo, snapshot, hand) -> None:
    plain = zoo.fresh("builtin:tiny").model
    shot = snapshot(plain)
    apply_passes(plain, [PrefixPass(length=2, gate="zero")])
    shot.assert_unchanged(plain)
    gpt2 = zoo.fresh("hf:gpt2").model
    config = gpt2.config
    shot = snapshot(gpt2)
    apply_passes(gpt2, [PrefixPass(length=2, reparameterize=True, reparam_hidden=8)])
    shot.assert_unchanged(gpt2)
    assert gpt2.config is config and config._attn_implementation == "sdpa"
    model, args = hand["mha"]
    shot = snapshot(model)
    apply_passes(model, [PrefixPass(length=2)], example_inputs=args)
    shot.assert_unchanged(model)


@pytest.mark.parametrize("kw", [{}, {"gate": "zero"},
                                {"reparameterize": True, "reparam_hidden": 8}])
def test_parameters_in_the_dtype_of_the_layer(kw: dict) -> None:
    model = TinyTransformer(TinyConfig(n_layers=1)).to(torch.bfloat16)
    adapted = apply_passes(model, [PrefixPass(length=2, **kw)])
    assert {p.dtype for _, p in named_trainable_parameters(adapted)} == {torch.bfloat16}
    ids = torch.randint(0, 256, (2, 5))
    assert adapted(ids).dtype == torch.bfloat16


def test_tiny_without_recorded_shapes_reads_heads_from_the_graph(zoo) -> None:
    plain = zoo.spec("builtin:tiny").model
    adapted = apply_passes(plain, [PrefixPass(length=2)])  # fx, no example inputs
    assert adapted.get_submodule("layers.1.attn.prefix.default").value.shape == (4, 2, 16)

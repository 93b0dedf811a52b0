"""Tests of the prefix on ``nn.MultiheadAttention`` called by ``nn.TransformerEncoderLayer``
(passes/prefix_holders.py): the layer's site graph is traced from its fast-path-free
computation, so the zoo's ``builtin:encoder`` takes a prefix."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from passes.prefix import PrefixPass
from passes.prefix_modules import LearnedPrefix, PrefixGate
from surgery import (
    SiteGraph,
    UnsupportedSiteError,
    apply_passes,
    named_trainable_parameters,
)
from surgery.sites.site_graph import plain_module


@pytest.fixture
def encoder(zoo) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``builtin:encoder`` in eval mode, its input ``(2, 16, 64)``, and a padding mask
    hiding the last 4 positions of sample 1."""
    spec = zoo.spec("builtin:encoder")
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, -4:] = True
    return spec.model.eval(), spec.example_inputs[0], pad


@pytest.mark.parametrize("pattern", [None, "layers.0.*", "layers.0.self_attn"])
def test_encoder_layers_take_a_prefix(encoder, pattern) -> None:
    model, x, pad = encoder
    adapted = apply_passes(model, [PrefixPass(length=2, pattern=pattern)], example_inputs=(x,))
    layers = [0, 1] if pattern is None else [0]
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == sorted(
        f"layers.{i}.self_attn.prefix.default.{part}" for i in layers for part in ("key", "value"))
    assert isinstance(adapted.layers[0], SiteGraph)
    assert isinstance(adapted.layers[0].template, nn.TransformerEncoderLayer)
    assert set(adapted.state_dict()) - set(model.state_dict()) == {
        f"layers.{i}.self_attn.prefix.default.{part}" for i in layers for part in ("key", "value")}
    with torch.no_grad():  # fast path on: the base model runs PyTorch's fused kernel
        assert (adapted(x) - model(x)).abs().max() > 1e-2, "the prefix reaches attention"
        assert (adapted(x, src_key_padding_mask=pad) - model(x, src_key_padding_mask=pad)
                ).abs().max() > 1e-2


@pytest.mark.parametrize("kw", [{"length": 0}, {"length": 3, "gate": "zero"}])
def test_encoder_identity_at_init(encoder, no_mha_fastpath, kw) -> None:
    model, x, pad = encoder
    ref = apply_passes(model, [])  # frozen weights, as in the adapted model
    adapted = apply_passes(model, [PrefixPass(**kw)], example_inputs=(x,))
    with torch.no_grad():
        for mask in (None, pad):
            assert torch.equal(adapted(x, src_key_padding_mask=mask),
                               ref(x, src_key_padding_mask=mask))


def test_encoder_prefix_math_padding_and_gradients(encoder, no_mha_fastpath) -> None:
    model, x, pad = encoder
    adapted = apply_passes(model, [PrefixPass(length=3, pattern="layers.0.*")],
                           example_inputs=(x,))
    attn = adapted.layers[0].self_attn
    prefix = attn.prefix.default
    with torch.no_grad():  # the layer's attention equals nn.MultiheadAttention with the
        got = adapted.layers[0](x, src_key_padding_mask=pad)  # prefix in front of k and v
        k = torch.cat([prefix.key.expand(2, 3, 64), x], 1)
        v = torch.cat([prefix.value.expand(2, 3, 64), x], 1)
        keep_pad = torch.cat([torch.zeros(2, 3, dtype=torch.bool), pad], 1)
        plain = model.layers[0]
        a = plain.self_attn(x, k, v, key_padding_mask=keep_pad, need_weights=False)[0]
        h = plain.norm1(x + a)
        want = plain.norm2(h + plain.linear2(torch.relu(plain.linear1(h))))
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"error {err:.3g}"  # frozen vs trainable weights: another kernel
    changed = x.clone()
    changed[1, -4:] = 100.0  # padded positions: no effect on the others
    with torch.no_grad():
        a1 = adapted(x, src_key_padding_mask=pad)
        a2 = adapted(changed, src_key_padding_mask=pad)
    assert torch.equal(a1[:, :12], a2[:, :12]) and torch.equal(a1[0], a2[0])
    adapted.train()
    adapted(x, src_key_padding_mask=pad).square().mean().backward()
    assert prefix.key.grad.abs().sum() > 0 and prefix.value.grad.abs().sum() > 0


def test_encoder_copies_pickles_and_plain_layer(encoder, no_mha_fastpath) -> None:
    model, x, _ = encoder
    adapted = apply_passes(model, [PrefixPass(length=2, gate="zero")], example_inputs=(x,))
    with torch.no_grad():
        for mod in adapted.modules():
            if isinstance(mod, (LearnedPrefix, PrefixGate)):
                for p in mod.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        want = adapted(x)
        buf = io.BytesIO()
        pickle.dump(adapted, buf)
        assert torch.equal(copy.deepcopy(adapted)(x), want)
        assert torch.equal(pickle.loads(buf.getvalue())(x), want)
    plain = plain_module(adapted.layers[0])  # what unload puts back: the user's class
    assert type(plain) is nn.TransformerEncoderLayer
    with torch.no_grad():
        assert torch.equal(plain(x), apply_passes(model, []).layers[0](x))


class _Branching(nn.Module):
    """Calls an ``nn.MultiheadAttention`` after a branch on its input torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return self.attn(x, x, x, need_weights=False)[0]


class _Straight(_Branching):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_an_untraceable_caller_of_multihead_attention_is_refused_with_a_way_out(
        snapshot) -> None:
    model = nn.Sequential(_Branching(), nn.Linear(16, 16)).eval()
    x = torch.randn(2, 5, 16)
    shot = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=r"PrefixPass: 0.attn \(nn.MultiheadAttention\)"
                                                   r" gets its prefix in the forward of the "
                                                   r"module calling it, 0 \(_Branching\), which "
                                                   r"torch.fx cannot trace.*Way out: give "
                                                   r"_Branching a forward torch.fx can trace.*"
                                                   r"or exclude='0.attn'"):
        apply_passes(model, [PrefixPass(length=2)], example_inputs=(x,))
    shot.assert_unchanged(model)
    model[0].__class__ = _Straight  # the way out: a forward torch.fx can trace
    adapted = apply_passes(model, [PrefixPass(length=2)], example_inputs=(x,))
    assert [n for n, _ in named_trainable_parameters(adapted)] == [
        "0.attn.prefix.default.key", "0.attn.prefix.default.value"]

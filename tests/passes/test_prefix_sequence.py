"""Tests of passes/prefix_sequence.py: ``PrefixPass(mode="sequence")`` prepends learned
vectors to a module's ``(batch, seq, d)`` input, and refuses sites where the longer sequence
cannot reach the output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prefix_cases import WithMixer
from torch import nn

from passes.prefix import PrefixPass
from surgery import UnsupportedSiteError, apply_passes, named_trainable_parameters
from surgery.sites.site_graph import SiteGraph

# ---- sequence mode ------------------------------------------------------------------------


def test_sequence_mode_shapes_and_values() -> None:
    torch.manual_seed(6)
    model = WithMixer().eval()
    x = torch.randn(2, 5, 4)
    zero = apply_passes(model, [PrefixPass(length=0, mode="sequence", pattern="mixer")],
                        example_inputs=(x,))
    assert torch.equal(zero(x), model(x))
    adapted = apply_passes(model, [PrefixPass(length=3, mode="sequence", pattern="mixer")],
                           example_inputs=(x,))
    assert type(adapted) is WithMixer and isinstance(adapted.mixer, SiteGraph)
    vectors = adapted.get_submodule("mixer.prefix.default").vectors
    assert vectors.shape == (3, 16)
    out = adapted(x)
    assert out.shape == (2, 8, 2), "(B, L, d) -> (B, P + L, d) at the mixer's input"
    h = torch.cat([vectors.detach().expand(2, 3, 16), model.embed(x)], 1)
    assert torch.equal(out, model.head(model.mixer(h)))
    out.pow(2).sum().backward()
    assert vectors.grad.abs().sum() > 0
    first = next(n for n in adapted.mixer.graph.nodes if n.op != "placeholder")
    assert first.target == "prefix.default" and first.meta["surgery"]["part"] == "prefix"


class Block(nn.Module):
    """A pre-LN block that uses no mask: ``x + attn(ln(x))``, then ``+ mlp(ln(x))``."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))
        return x + self.mlp(self.ln_2(x))


class PooledStack(nn.Module):
    """Features ``(B, L, 8)`` -> Linear -> two mask-free :class:`Block` s -> mean -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def test_sequence_prefix_on_the_first_layer_of_a_mask_free_stack(snapshot) -> None:
    torch.manual_seed(7)
    model = PooledStack().eval()
    x = torch.randn(2, 5, 8)
    shot = snapshot(model)
    adapted = apply_passes(model, [PrefixPass(length=3, mode="sequence", pattern="layers.0")],
                           example_inputs=(x,))
    shot.assert_unchanged(model)
    assert [n for n, _ in named_trainable_parameters(adapted)] == [
        "layers.0.prefix.default.vectors"]
    vectors = adapted.get_submodule("layers.0.prefix.default").vectors
    assert vectors.shape == (3, 16)
    out = adapted(x)
    assert out.shape == (2, 3)
    h = model.layers[1](model.layers[0](torch.cat([vectors.detach().expand(2, 3, 16),
                                                   model.proj(x)], 1)))
    assert torch.equal(out, model.head(h.mean(dim=1)))
    out.pow(2).sum().backward()
    assert vectors.grad.abs().sum() > 0
    assert [n for n, p in adapted.named_parameters() if p.grad is not None] == [
        "layers.0.prefix.default.vectors"], "the base stays frozen"
    assert adapted(torch.randn(3, 7, 8)).shape == (3, 3), "other batch and sequence sizes"


@pytest.mark.parametrize("which,site,shape", [
    ("builtin:tiny", "embed", r"torch.int64 of shape \(2, 16\)"),
    ("hf:gpt2", "transformer.wte", "torch.int64 of shape"),
    ("hf:bert", "embeddings.word_embeddings", "torch.int64 of shape"),
])
def test_sequence_mode_refuses_token_ids(zoo, snapshot, which: str, site: str, shape: str) -> None:
    spec = zoo.spec(which)
    shot = snapshot(spec.model)
    with pytest.raises(UnsupportedSiteError, match=f"input of {site} .*{shape}.*Way out"):
        apply_passes(spec.model, [PrefixPass(length=4, mode="sequence", pattern=site)],
                     example_inputs=spec.example_inputs, example_kwargs=spec.example_kwargs)
    shot.assert_unchanged(spec.model)


@pytest.mark.parametrize("which,site", [("builtin:tiny", "layers.0.ln_1"),
                                        ("hf:gpt2", "transformer.h.0.ln_1")])
def test_sequence_mode_refuses_a_site_whose_length_cannot_reach_the_output(
        zoo, snapshot, which: str, site: str) -> None:
    spec = zoo.spec(which)
    shot = snapshot(spec.model)
    with pytest.raises(UnsupportedSiteError, match=f"at {site} \\(LayerNorm, input "
                                                   f"torch.float32 .*Way out") as info:
        apply_passes(spec.model, [PrefixPass(length=4, mode="sequence", pattern=site)],
                     example_inputs=spec.example_inputs)
    assert isinstance(info.value.__cause__, RuntimeError)
    shot.assert_unchanged(spec.model)


def test_sequence_mode_on_a_plain_model_refused_at_apply_time(zoo, snapshot) -> None:
    spec = zoo.fresh("builtin:tiny")
    shot = snapshot(spec.model)
    with pytest.raises(UnsupportedSiteError, match="layers.0.ln_1"):  # even with P = 0
        apply_passes(spec.model, [PrefixPass(length=0, mode="sequence", pattern="layers.0.ln_1")],
                     example_inputs=spec.example_inputs)
    shot.assert_unchanged(spec.model)
    with pytest.raises(UnsupportedSiteError, match="input of mixer: no example inputs.*Way out: "
                                                   "pass example_inputs="):
        apply_passes(WithMixer(), [PrefixPass(length=2, mode="sequence", pattern="mixer")])


def test_sequence_mode_names_the_site_at_fault_among_several() -> None:
    x = torch.randn(2, 5, 8)
    with pytest.raises(UnsupportedSiteError, match=r"at layers\.0\.ln_1 \(LayerNorm, input "
                                                   r"torch.float32 \(2, 5, 16\)\)"):
        apply_passes(PooledStack(), [PrefixPass(length=2, mode="sequence",
                                                pattern=["proj", "layers.0.ln_1"])],
                     example_inputs=(x,))

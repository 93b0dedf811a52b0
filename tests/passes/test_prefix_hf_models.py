"""Tests of the prefix in transformers models beyond the attention-interface basics
(passes/prefix_hf.py): T5's relative position bias, attention implementations switched after
the prefix was added, and a failed in-place apply."""

from __future__ import annotations

import pytest
import torch

from passes.prefix import PrefixPass
from passes.prefix_hf import INTERFACE_PREFIX, prefix_attention
from passes.prefix_modules import LearnedPrefix, PrefixGate
from surgery import LoRAPass, NoMatchError, UnsupportedSiteError, apply_passes

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32, same math in another order (cache, eager vs SDPA)


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Prefixes ~ N(0, 1), gates ~ N(0, 0.5²): far from the identity, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (LearnedPrefix, PrefixGate)):
                scale = 0.5 if isinstance(mod, PrefixGate) else 1.0
                for p in mod.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL * max(1.0, want.abs().max().item()), f"error {err:.3g}"


def _t5(implementation: str = "sdpa") -> torch.nn.Module:
    """A 2+2-layer T5 (4 heads of 8, relative position bias) with random weights."""
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _t5_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 128, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding on the right of sample 1
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5]}


# ---- T5: relative position bias ---------------------------------------------------------------


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_t5_position_bias_gets_zero_columns_for_the_prefix(base: str) -> None:
    adapted = apply_passes(_t5(base), [PrefixPass(length=3)])
    _randomize(adapted)
    attn = adapted.get_submodule("encoder.block.0.layer.0.SelfAttention")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, generator=gen)
    with torch.no_grad():
        out, _ = prefix_attention(attn, q, k, v, None, base=base, scaling=1.0, dropout=0.0,
                                  position_bias=bias)
        pk = attn.prefix.default.key.expand(2, 4, 3, 8)
        pv = attn.prefix.default.value.expand(2, 4, 3, 8)
        scores = q.double() @ torch.cat([pk, k], 2).double().transpose(-1, -2)
        scores = scores + torch.cat([torch.zeros(1, 4, 5, 3), bias], -1).double()
        want = torch.softmax(scores, -1) @ torch.cat([pv, v], 2).double()
    _close(out, want.transpose(1, 2))


def test_t5_forward_generate_and_zero_gate() -> None:
    model, inputs = _t5(), _t5_inputs()
    adapted = apply_passes(model, [PrefixPass(length=4)])
    assert adapted.decoder.config._attn_implementation == INTERFACE_PREFIX + "sdpa"
    assert model.decoder.config._attn_implementation == "sdpa", "the caller's config"
    _randomize(adapted)
    with torch.no_grad():
        base = model(**inputs).logits
        out = adapted(**inputs).logits
        kw = {"max_new_tokens": 6, "do_sample": False}
        cached = adapted.generate(inputs["input_ids"], use_cache=True, **kw)
        uncached = adapted.generate(inputs["input_ids"], use_cache=False, **kw)
    assert out.shape == (2, 5, 128) and (out - base).abs().max() > 1e-2
    assert cached.shape == (2, 7) and torch.equal(cached, uncached)
    eager = apply_passes(_t5("eager"), [PrefixPass(length=4)])
    eager.load_state_dict(adapted.state_dict())
    with torch.no_grad():
        _close(eager(**inputs).logits, out)
    gated = apply_passes(model, [PrefixPass(length=4, gate="zero")])
    with torch.no_grad():
        assert torch.equal(gated(**inputs).logits, base), "bitwise identity at init"


# ---- switching the attention implementation after the prefix ---------------------------------


def test_the_prefix_follows_set_attn_implementation(zoo) -> None:
    model = zoo.spec("hf:llama").model
    adapted = apply_passes(model, [PrefixPass(length=4)])
    _randomize(adapted)
    ids = torch.randint(0, 127, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, base = adapted(ids).logits, model(ids).logits
    for implementation in ("eager", "sdpa"):
        adapted.set_attn_implementation(implementation)
        with torch.no_grad():
            out = adapted(ids).logits
        assert adapted.config._attn_implementation == INTERFACE_PREFIX + implementation
        _close(out, ref)
        assert (out - base).abs().max() > 1e-2, "the prefix is still there"
    adapted.set_attn_implementation("eager")
    adapted.train()
    adapted(ids, labels=ids).loss.backward()
    prefix = adapted.get_submodule("model.layers.0.self_attn.prefix.default")
    assert prefix.key.grad is not None and prefix.key.grad.abs().sum() > 0
    assert model.config._attn_implementation == "sdpa", "the caller's config is untouched"


def test_switching_to_an_implementation_a_prefix_cannot_extend_is_loud(zoo) -> None:
    adapted = apply_passes(zoo.spec("hf:llama").model, [PrefixPass(length=4)])
    adapted.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(UnsupportedSiteError, match=r"PrefixPass: model.layers.0.self_attn "
                                                   r"\(LlamaAttention\) carries a prefix.*"
                                                   r"switched to 'flex_attention' after the "
                                                   r"prefix was added.*Way out: "
                                                   r"model.set_attn_implementation\('sdpa'\)"):
        adapted(torch.zeros(1, 4, dtype=torch.long))


# ---- failed in-place apply ------------------------------------------------------------------


def test_a_failed_in_place_apply_puts_the_implementation_back(zoo) -> None:
    model = zoo.fresh("hf:llama").model.eval()
    ids = torch.randint(0, 127, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(NoMatchError):
        apply_passes(model, [PrefixPass(length=2), LoRAPass(pattern="nothing")], inplace=True)
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, LearnedPrefix) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)

"""Tests of the prefix in transformers models (passes/prefix_hf.py): the adapted model keeps
its class, the KV cache, ``generate``, padding, ``labels=``, attention dropout, copies and
pickles, with the prefix reaching attention through transformers' attention interface."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from passes.prefix import PrefixPass
from passes.prefix_hf import INTERFACE_PREFIX, kv_layout, prefix_attention
from passes.prefix_modules import AttentionPrefix, LearnedPrefix, PrefixGate
from passes.stack import AdapterStack
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    LoRAPass,
    UnsupportedSiteError,
    apply_passes,
    named_trainable_parameters,
)
from surgery.adapters.active import set_active

pytest.importorskip("transformers")

CAUSAL = ["hf:llama", "hf:gpt2"]
TOL = 1e-5  # float32, same math in another order (cache, padding columns, eager vs SDPA)
ROOT = Path(__file__).resolve().parents[2]


def _ids(batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 127, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Prefixes ~ N(0, 1), gates ~ N(0, 0.5²): far from the identity, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (LearnedPrefix, PrefixGate)):
                for p in mod.parameters():
                    scale = 0.5 if isinstance(mod, PrefixGate) else 1.0
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    assert err <= TOL * max(1.0, want.abs().max().item()), f"error {err:.3g}"


@pytest.fixture(scope="module", params=CAUSAL)
def causal(request, zoo):
    """A causal LM of the zoo adapted with a length-4 prefix (and an ungated twin)."""
    spec = zoo.spec(request.param)
    adapted = apply_passes(spec.model, [PrefixPass(length=4)])
    return request.param, spec.model, adapted


def test_the_adapted_model_is_the_users_model(causal) -> None:
    name, model, adapted = causal
    assert type(adapted) is type(model)
    assert adapted.config is not model.config, "the config is the copy's own"
    assert model.config._attn_implementation == "sdpa", "the caller's config is untouched"
    assert adapted.config._attn_implementation == INTERFACE_PREFIX + "sdpa"
    attn = "model.layers.0.self_attn" if name == "hf:llama" else "transformer.h.0.attn"
    prefix = adapted.get_submodule(f"{attn}.prefix.default")
    assert isinstance(prefix, AttentionPrefix)
    assert type(adapted.get_submodule(attn)) is type(model.get_submodule(attn))
    # LLaMA: 2 key/value heads for 4 query heads (GQA); GPT-2: 4 heads; head size 16
    assert prefix.key.shape == ((2, 4, 16) if name == "hf:llama" else (4, 4, 16))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
            scale: float) -> torch.Tensor:
    """``softmax(q k^T · scale)`` over the keys ``keep`` allows, times ``v``, in float64;
    key/value heads repeated for grouped queries."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_the_attention_function_computes_the_papers_formula(zoo, base: str) -> None:
    spec = zoo.spec("hf:llama")
    adapted = apply_passes(spec.model, [PrefixPass(length=3),
                                        PrefixPass(length=2, gate="zero", name="g")])
    _randomize(adapted)
    attn = adapted.get_submodule("model.layers.0.self_attn")
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(2, 4, 5, 16, generator=gen)  # 4 query heads
    k, v = torch.randn(2, 2, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
    keep = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    keep[1, ..., :2] = False  # sample 1: two padded keys
    mask = keep if base == "sdpa" else torch.zeros(keep.shape).masked_fill(~keep, -1e30)
    with torch.no_grad():
        out, _ = prefix_attention(attn, q, k, v, mask, base=base, scaling=0.3, dropout=0.0)
        plain, gated = attn.prefix.default, attn.prefix.g
        pk, pv = plain.key.expand(2, 2, 3, 16), plain.value.expand(2, 2, 3, 16)
        gk, gv = gated.key.expand(2, 2, 2, 16), gated.value.expand(2, 2, 2, 16)
        seen = torch.cat([torch.ones(2, 1, 5, 3, dtype=torch.bool), keep], -1)
        main = _attend(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), seen, 0.3)
        side = _attend(q, gk, gv, torch.ones(1, 1, 5, 2, dtype=torch.bool), 0.3)
        g = attn.prefix_gate.g.weight.double().view(1, 4, 1, 1)
        _close(out.double(), (main + g * side).transpose(1, 2))
        if base == "sdpa":  # no mask, several queries: causal, the prefix visible to all
            out, _ = prefix_attention(attn, q, k, v, None, base=base, scaling=0.3)
            causal = torch.cat([torch.ones(5, 3, dtype=torch.bool),
                                torch.ones(5, 5, dtype=torch.bool).tril()], -1)
            main = _attend(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), causal, 0.3)
            _close(out.double(), (main + g * side).transpose(1, 2))


def _incremental_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                        start: int) -> torch.Tensor:
    """Logits of positions ``start ..`` computed one token at a time with the KV cache."""
    out = model(ids[:, :start], attention_mask=mask[:, :start], use_cache=True)
    steps, cache = [out.logits[:, -1]], out.past_key_values
    for t in range(start, ids.shape[1] - 1):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
        cache = out.past_key_values
    return torch.stack(steps, 1)


@pytest.mark.parametrize("gate", [None, "zero"])
def test_kv_cache_equals_the_full_forward(causal, gate) -> None:
    _, model, _ = causal
    adapted = apply_passes(model, [PrefixPass(length=4, gate=gate)])
    _randomize(adapted)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding on the right of sample 1
    with torch.no_grad():
        full = adapted(ids, attention_mask=mask, use_cache=False).logits
        steps = _incremental_logits(adapted, ids, mask, 4)
        base = model(ids, attention_mask=mask).logits
    _close(steps, full[:, 3:-1])
    assert (full - base).abs().max() > 1e-2, "the prefix changes the outputs"


def test_generate_with_cache_equals_generate_without(causal) -> None:
    _, model, adapted = causal
    ids = _ids(1, 5, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = adapted.generate(ids, use_cache=True, **kw)
        uncached = adapted.generate(ids, use_cache=False, **kw)
        scores = adapted.generate(ids, use_cache=True, output_logits=True,
                                  return_dict_in_generate=True, **kw).logits
        base = model.generate(ids, use_cache=True, output_logits=True,
                              return_dict_in_generate=True, **kw).logits
    assert cached.shape == (1, 13) and torch.equal(cached, uncached)
    assert not torch.equal(torch.stack(scores), torch.stack(base)), "generation sees the prefix"


def test_generate_a_left_padded_batch_as_each_sample_alone(causal) -> None:
    _, _, adapted = causal
    ids = _ids(2, 7, seed=15)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        both = adapted.generate(ids, attention_mask=mask, **kw)
        alone = adapted.generate(ids[:1, 3:], attention_mask=mask[:1, 3:], **kw)
    assert torch.equal(both.sequences[0, 7:], alone.sequences[0, 4:])
    _close(torch.stack(both.logits)[:, 0], torch.stack(alone.logits)[:, 0])


@pytest.mark.parametrize("which", ["hf:llama", "hf:gpt2", "hf:bert"])
def test_a_padded_sample_equals_the_sample_alone(zoo, which: str) -> None:
    spec = zoo.spec(which)
    adapted = apply_passes(spec.model, [PrefixPass(length=4)])
    ids = _ids(2, 9, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, so that a causal model's real tokens follow it
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    first = lambda out: out.logits if hasattr(out, "logits") else out.last_hidden_state
    with torch.no_grad():
        padded = first(adapted(ids, attention_mask=mask, position_ids=positions))
        alone = first(adapted(ids[:1, 3:], attention_mask=mask[:1, 3:]))
        other = ids.clone()
        other[0, :3] = (ids[0, :3] + 11) % 127  # other tokens under the padding
        changed = first(adapted(other, attention_mask=mask, position_ids=positions))
    _close(padded[:1, 3:], alone)
    assert torch.equal(padded[0, 3:], changed[0, 3:]), "padded tokens are never seen"
    assert torch.equal(padded[1], changed[1])


def test_bert_stays_bidirectional(zoo) -> None:
    spec = zoo.spec("hf:bert")
    adapted = apply_passes(spec.model, [PrefixPass(length=4)])
    ids = _ids(1, 8, seed=5)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % 127
    with torch.no_grad():  # no mask at all: SDPA gets none, and none is built
        a = adapted(ids).last_hidden_state
        b = adapted(other).last_hidden_state
    assert not torch.equal(a[0, 0], b[0, 0]), "the first token sees the last"


def test_labels_loss_reaches_exactly_the_prefix(causal) -> None:
    _, _, adapted = causal
    adapted = copy.deepcopy(adapted)
    ids = _ids(2, 8, seed=6)
    loss = adapted(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = sorted(n for n, _ in named_trainable_parameters(adapted))
    assert len(trainable) == 4 and all(".prefix.default." in n for n in trainable)
    got = sorted(n for n, p in adapted.named_parameters() if p.grad is not None)
    assert got == trainable
    assert all(p.grad.abs().sum() > 0 for _, p in named_trainable_parameters(adapted))


def test_lora_on_the_projections_and_a_prefix_at_the_op(zoo) -> None:
    spec = zoo.spec("hf:llama")
    alone = apply_passes(spec.model, [PrefixPass(length=4)])
    both = apply_passes(spec.model, [LoRAPass(pattern=["q_proj", "v_proj"]), PrefixPass(length=4)])
    both.load_state_dict({k: v for k, v in alone.state_dict().items() if ".prefix." in k},
                         strict=False)
    ids = _ids(2, 8, seed=13)
    with torch.no_grad():  # B = 0: the prefix alone acts
        assert torch.equal(both(ids).logits, alone(ids).logits)
    both(input_ids=ids, labels=ids).loss.backward()
    names = {n for n, p in both.named_parameters() if p.grad is not None}
    assert names == {n for n, _ in named_trainable_parameters(both)}
    assert {n.split(".")[4] for n in names} == {"q_proj", "v_proj", "prefix"}


def test_gradient_checkpointing_gives_the_same_gradients(causal) -> None:
    _, _, adapted = causal
    ids = _ids(2, 8, seed=14)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(adapted).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in named_trainable_parameters(model)})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_zero_gate_learns_the_gate_first(zoo) -> None:
    spec = zoo.spec("hf:llama")
    adapted = apply_passes(spec.model, [PrefixPass(length=4, gate="zero")])
    ids = _ids(2, 8, seed=7)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, spec.model(ids).logits), "identity at init"
    adapted(input_ids=ids, labels=ids).loss.backward()
    gates = [m for m in adapted.modules() if isinstance(m, PrefixGate)]
    assert len(gates) == 2 and all(g.weight.shape == (4,) for g in gates), "one per query head"
    assert all(g.weight.grad.abs().min() > 0 for g in gates)
    prefixes = [m for m in adapted.modules() if isinstance(m, AttentionPrefix)]
    assert all(p.key.grad is None or p.key.grad.abs().sum() == 0 for p in prefixes)


def test_copies_and_pickles_keep_outputs(causal, tmp_path: Path) -> None:
    name, _, adapted = causal
    ids = _ids(2, 7, seed=8)
    with torch.no_grad():
        want = adapted(ids).logits
        for other in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
            assert other.config._attn_implementation == INTERFACE_PREFIX + "sdpa"
            assert torch.equal(other(ids).logits, want)
        buf = io.BytesIO()
        torch.save(adapted, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(ids).logits, want)
    if name != "hf:llama":
        return
    # a new process knows nothing of the registered attention function until unpickling
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(adapted))
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import pickle, sys, torch; d = sys.argv[1]; "
            "m = pickle.load(open(d + '/model.pkl', 'rb')); "
            "torch.save(m(torch.load(d + '/ids.pt')).logits, d + '/out.pt')")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_attention_dropout_still_acts_in_train(zoo) -> None:
    model = zoo.fresh("hf:llama").model
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    adapted = apply_passes(model, [PrefixPass(length=4)])
    ids = _ids(2, 8, seed=9)
    with torch.no_grad():
        adapted.train()
        torch.manual_seed(0)
        a = adapted(ids).logits
        b = adapted(ids).logits
        adapted.eval()
        c, d = adapted(ids).logits, adapted(ids).logits
    assert not torch.equal(a, b), "dropout draws differ in train()"
    assert torch.equal(c, d), "no dropout in eval()"


def test_eager_attention_is_wrapped_too(zoo) -> None:
    sdpa_model = zoo.spec("hf:llama").model
    eager_model = copy.deepcopy(sdpa_model)
    eager_model.set_attn_implementation("eager")
    sdpa = apply_passes(sdpa_model, [PrefixPass(length=4)])
    eager = apply_passes(eager_model, [PrefixPass(length=4)])
    assert eager.config._attn_implementation == INTERFACE_PREFIX + "eager"
    _randomize(sdpa)
    _randomize(eager)
    ids = _ids(2, 9, seed=10)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        _close(eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)
        _close(_incremental_logits(eager, ids, mask, 3),
               eager(ids, attention_mask=mask).logits[:, 2:-1])


def test_a_second_prefix_joins_the_first(zoo) -> None:
    spec = zoo.spec("hf:llama")
    once = apply_passes(spec.model, [PrefixPass(length=4)])
    twice = apply_passes(once, [PrefixPass(length=2, name="other")])
    assert twice.config._attn_implementation == INTERFACE_PREFIX + "sdpa"
    assert twice.get_submodule("model.layers.1.self_attn.prefix.other").key.shape == (2, 2, 16)
    ids = _ids(2, 6, seed=11)
    with torch.no_grad():
        both = twice(ids).logits
        set_active(twice, "default")
        assert torch.equal(twice(ids).logits, once(ids).logits)
    assert not torch.equal(both, once(ids).logits)
    with pytest.raises(AlreadyAdaptedError, match=r"model.layers.0.self_attn \(LlamaAttention\) "
                                                  r"already has an adapter named 'default'"):
        apply_passes(once, [PrefixPass(length=2)])


def test_implementations_a_prefix_cannot_extend_are_refused(zoo, snapshot) -> None:
    model = zoo.fresh("hf:llama").model
    model.config._attn_implementation_internal = "flex_attention"
    shot = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=r"model.layers.0.self_attn \(LlamaAttention\) "
                                                   r"runs attention implementation "
                                                   r"'flex_attention'.*Way out"):
        apply_passes(model, [PrefixPass(length=4)])
    shot.assert_unchanged(model)
    assert model.config._attn_implementation == "flex_attention"


def test_per_sample_routing_takes_gates_and_refuses_a_bare_prefix(zoo) -> None:
    spec = zoo.spec("hf:llama")
    adapted = apply_passes(spec.model, [PrefixPass(length=3, gate="zero", name="g"),
                                        PrefixPass(length=2, gate="zero", name="h"),
                                        PrefixPass(length=2, name="x")])
    _randomize(adapted)
    ids = _ids(4, 6, seed=12)
    refs = {}
    with torch.no_grad():
        for key in ("g", "h", "x"):
            set_active(adapted, key)
            refs[key] = adapted(ids).logits
        set_active(adapted, ["g", "h"])  # x off: the stack routes between g and h only
        gated = AdapterStack(adapted, names=["g", "h"])
        routed = gated(ids, adapter_id=torch.tensor([0, 1, 1, 0])).logits
        for row, key in enumerate("ghhg"):
            assert torch.equal(routed[row], refs[key][row]), row
        set_active(adapted, ["g", "x"])
        stack = AdapterStack(adapted, names=["g", "x"])
        with pytest.raises(ConfigError, match=r"AttentionPrefix, adapter 'x'\) gives an output "
                                              r"of shape .* when active and .* when not"):
            stack(ids, adapter_id=torch.tensor([0, 1, 0, 1]))
        assert torch.equal(stack(ids, adapter_id="x").logits, refs["x"])


def test_gqa_llama_prefix_has_the_key_value_heads(zoo, run_model) -> None:
    spec = zoo.spec("hf:llama")
    k_proj = spec.model.get_submodule("model.layers.0.self_attn.k_proj")
    assert k_proj.out_features == 32, "2 key/value heads of 16 for 4 query heads"
    adapted = apply_passes(spec.model, [PrefixPass(length=3, pattern="self_attn")])
    prefix = adapted.get_submodule("model.layers.0.self_attn.prefix.default")
    assert prefix.key.shape == (2, 3, 16), "the prefix joins the keys before repeat_kv"
    with torch.no_grad():
        assert not torch.equal(run_model(adapted, spec), run_model(spec.model, spec))


@pytest.mark.parametrize("model", ["hf:llama", "hf:bert"])
def test_padding_ignored_hf(zoo, run_model, model: str) -> None:
    spec = zoo.spec(model)
    adapted = apply_passes(spec.model, [PrefixPass(length=4)])
    ids = spec.example_inputs[0].clone()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a causal model's real tokens come after it
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 5) % 128
    with torch.no_grad():
        a = run_model(adapted, spec, args=(ids,), kwargs={"attention_mask": mask})
        b = run_model(adapted, spec, args=(other,), kwargs={"attention_mask": mask})
    assert torch.equal(a[0, 3:], b[0, 3:])
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("model", ["hf:gpt2", "hf:llama", "hf:bert"])
def test_hf_models_accept_other_sizes(zoo, run_model, model: str) -> None:
    spec = zoo.spec(model)
    kwargs = lambda b, n: ({"attention_mask": torch.ones(b, n, dtype=torch.long)}
                           if spec.example_kwargs else {})
    zero = apply_passes(spec.model, [PrefixPass(length=0)])
    three = apply_passes(spec.model, [PrefixPass(length=3)])
    for b, n in ((3, 7), (1, 20)):
        ids = torch.randint(0, 128, (b, n))
        with torch.no_grad():
            base = run_model(spec.model, spec, args=(ids,), kwargs=kwargs(b, n))
            assert torch.equal(run_model(zero, spec, args=(ids,), kwargs=kwargs(b, n)), base)
            out = run_model(three, spec, args=(ids,), kwargs=kwargs(b, n))
        assert out.shape == base.shape and torch.isfinite(out).all()


class _PerLayerConfig:
    """A configuration that keeps head_dim per layer and refuses a model-wide read, as
    transformers' heterogeneous configurations (Gemma 4) do."""

    num_attention_heads = 4
    num_key_value_heads = 2
    hidden_size = 64

    @property
    def head_dim(self) -> int:
        raise RuntimeError("'head_dim' is a per-layer attribute")


def test_kv_layout_reads_the_module_before_its_config() -> None:
    attention = torch.nn.Module()
    attention.config = _PerLayerConfig()
    attention.head_dim = 32  # this layer's own, unlike hidden_size // heads = 16
    assert kv_layout(attention, "layers.0.self_attn") == (2, 32, 4)
    del attention.head_dim  # the config refuses: fall back on hidden_size // heads
    assert kv_layout(attention, "layers.0.self_attn") == (2, 16, 4)

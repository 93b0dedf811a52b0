"""Tests of surgery/zoo.py: every model builds, runs, is seeded and leaves the caller's RNG alone."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch
import torch.fx
from torch import nn

from surgery.errors import ConfigError, NoMatchError
from surgery.zoo import (
    ConvNet,
    ModelSpec,
    TinyConfig,
    TinyTransformer,
    available_models,
    build_attention_mask,
    load_model,
    transformer_encoder,
)
from surgery.zoo.hf_tiny import tiny_architectures

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# spec -> {output field: shape}; "" is the output itself when it is a tensor.
EXPECTED_OUTPUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "builtin:tiny": {"": (2, 16, 256)},
    "builtin:convnet": {"": (2, 10)},
    "builtin:encoder": {"": (2, 16, 64)},
    "hf:gpt2": {"logits": (2, 16, 128)},
    "hf:llama": {"logits": (2, 16, 128)},
    "hf:bert": {"last_hidden_state": (2, 16, 64), "pooler_output": (2, 64)},
    "hf:vit": {"last_hidden_state": (2, 17, 64), "pooler_output": (2, 64)},
}


def _params(spec: str) -> object:
    marks = [] if not spec.startswith("hf:") or HAS_TRANSFORMERS else [pytest.mark.skip("no transformers")]
    return pytest.param(spec, marks=marks, id=spec)


ALL_SPECS = [_params(spec) for spec in EXPECTED_OUTPUTS]


def _run(spec: ModelSpec) -> object:
    with torch.no_grad():
        return spec.model(*spec.example_inputs, **spec.example_kwargs)


def test_registry_lists_every_model() -> None:
    # the hand-written models first, then one tiny task model per transformers
    # architecture of surgery.zoo.hf_tiny (tested in tests/zoo/)
    tiny = [f"hf:{t}" for t in tiny_architectures() if f"hf:{t}" not in EXPECTED_OUTPUTS]
    assert available_models() == list(EXPECTED_OUTPUTS) + tiny
    assert {"hf:t5", "hf:bart", "hf:mixtral", "hf:qwen3_moe", "hf:swin", "hf:clip"} <= set(tiny)


@pytest.mark.parametrize("name", ALL_SPECS)
def test_model_builds_and_runs_with_documented_shapes(name: str) -> None:
    spec = load_model(name)
    assert spec.name == name
    assert not spec.model.training, "load_model returns models in eval mode"
    assert spec.description
    out = _run(spec)
    for field, shape in EXPECTED_OUTPUTS[name].items():
        value = out if field == "" else getattr(out, field)
        assert isinstance(value, torch.Tensor)
        assert tuple(value.shape) == shape, (name, field)
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", ALL_SPECS)
def test_same_seed_gives_bitwise_equal_weights_and_inputs(name: str) -> None:
    a, b = load_model(name, seed=3), load_model(name, seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for x, y in zip(a.example_inputs, b.example_inputs, strict=True):
        assert torch.equal(x, y)
    other = load_model(name, seed=4).model.state_dict()
    assert any(not torch.equal(sa[k], other[k]) for k in sa), "the seed must change the weights"


@pytest.mark.parametrize("name", ALL_SPECS)
def test_caller_rng_state_is_unchanged(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    load_model(name, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_builtin_is_an_alias_of_tiny() -> None:
    spec = load_model("builtin")
    assert spec.name == "builtin:tiny"
    assert isinstance(spec.model, TinyTransformer)
    assert spec.example_inputs[0].shape == (2, 16)
    assert spec.example_inputs[0].dtype == torch.long


def test_model_spec_is_frozen() -> None:
    spec = load_model("builtin:convnet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_unknown_spec_names_it_near_matches_and_the_way_out() -> None:
    with pytest.raises(NoMatchError, match=r"'hf:gpt3'.*nearest known: hf:gpt2") as info:
        load_model("hf:gpt3")
    message = str(info.value)
    assert "available_models()" in message
    assert "nn.Module" in message
    nearest = message.split("nearest known: ", 1)[1].split(".", 1)[0].split(", ")
    assert len(nearest) == 5
    assert isinstance(info.value, ValueError)


def test_unknown_builtin_suggests_builtins() -> None:
    with pytest.raises(NoMatchError, match=r"'builtin:convnett'.*nearest known: builtin:convnet"):
        load_model("builtin:convnett")


def test_non_string_spec_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="model name"):
        load_model(TinyTransformer())  # type: ignore[arg-type]


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"'hf:llama'.*pip install 'fx-surgery\[hf\]'"):
        load_model("hf:llama")


# ---- TinyTransformer -------------------------------------------------------------------


def _tiny() -> TinyTransformer:
    return load_model("builtin:tiny").model  # type: ignore[return-value]


def test_tiny_module_names() -> None:
    names = {name for name, _ in _tiny().named_modules()}
    expected = {"embed", "pos_embed", "ln_f", "lm_head"}
    for i in range(2):
        expected |= {f"layers.{i}.ln_1", f"layers.{i}.ln_2", f"layers.{i}.attn", f"layers.{i}.mlp"}
        expected |= {f"layers.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"layers.{i}.mlp.{p}" for p in ("up_proj", "act", "down_proj")}
    assert expected <= names
    assert isinstance(_tiny().get_submodule("layers.1.mlp.act"), nn.GELU)


def test_tiny_is_fx_traceable_without_inputs() -> None:
    model = _tiny()
    traced = torch.fx.symbolic_trace(model)
    ids = load_model("builtin:tiny").example_inputs[0]
    assert torch.equal(traced(ids), model(ids))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    assert torch.equal(traced(ids, mask), model(ids, mask))
    # other batch and sequence sizes run through the same graph
    ids2 = torch.randint(0, 256, (3, 5))
    assert torch.equal(traced(ids2), model(ids2))


def test_tiny_graph_shows_projections_and_attention() -> None:
    graph = torch.fx.symbolic_trace(_tiny()).graph
    modules = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "layers.0.attn.q_proj" in modules and "layers.1.mlp.down_proj" in modules
    sdpa = [n for n in graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 2
    assert sdpa[0].kwargs["attn_mask"].target is build_attention_mask


def test_tiny_is_causal() -> None:
    model = _tiny()
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(ids)[:, 8:], model(changed)[:, 8:])


def test_tiny_padding_is_hidden_from_real_tokens() -> None:
    model = TinyTransformer(TinyConfig(causal=False)).eval()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 256
    torch.testing.assert_close(model(ids, mask)[0, :6], model(changed, mask)[0, :6])
    torch.testing.assert_close(model(ids, mask)[0, :6], model(ids[:1, :6])[0])
    assert torch.isfinite(model(ids, mask)).all()


def test_attention_mask_shapes() -> None:
    ids = torch.zeros(3, 4, dtype=torch.long)
    causal = build_attention_mask(ids, None, True)
    assert causal.shape == (1, 1, 4, 4) and causal.dtype == torch.bool
    assert torch.equal(causal[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert build_attention_mask(ids, None, False).all()
    padded = build_attention_mask(ids, torch.tensor([[1, 1, 0, 0]] * 3), False)
    assert padded.shape == (3, 1, 4, 4)
    assert padded[0, 0, 0].tolist() == [True, True, False, False]
    assert padded[0, 0, 3].tolist() == [True, True, False, True]  # padding hides keys only
    left = build_attention_mask(ids, torch.tensor([[0, 0, 1, 1]] * 3), True)
    assert left[0, 0, 0].tolist() == [True, False, False, False]  # never an empty row
    assert left[0, 0, 3].tolist() == [False, False, True, True]


@pytest.mark.parametrize(
    ("field", "value"), [("d_model", 0), ("n_heads", 3), ("vocab_size", 2.5), ("n_layers", True)]
)
def test_tiny_config_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"TinyConfig.{field}|n_heads=3 does not divide"):
        TinyConfig(**{field: value})  # type: ignore[arg-type]


# ---- ConvNet and nn.TransformerEncoder --------------------------------------------------


def test_convnet_is_fx_traceable() -> None:
    spec = load_model("builtin:convnet")
    traced = torch.fx.symbolic_trace(spec.model)
    assert torch.equal(traced(*spec.example_inputs), spec.model(*spec.example_inputs))
    assert isinstance(spec.model, ConvNet)
    assert [type(m) for m in spec.model.classifier] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def test_encoder_layers_are_initialised_independently() -> None:
    encoder = transformer_encoder()
    assert isinstance(encoder, nn.TransformerEncoder)
    w0 = encoder.layers[0].linear1.weight
    w1 = encoder.layers[1].linear1.weight
    assert w0.shape == w1.shape == (128, 64)
    assert not torch.equal(w0, w1)


def test_encoder_is_not_fx_traceable_as_documented() -> None:
    # TransformerEncoder.forward branches on src.is_nested; the docstring says so, and
    # this test notices when a torch release changes it.
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(
            transformer_encoder(), concrete_args={"mask": None, "src_key_padding_mask": None, "is_causal": None}
        )

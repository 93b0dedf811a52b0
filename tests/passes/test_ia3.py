"""Tests of passes/ia3.py: default selection, input and output scaling, fused qkv slices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import MLP as ResidualMLP
from torch import nn

from passes.modules import IA3Vector
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    TraceError,
    apply_passes,
    named_trainable_parameters,
)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.down = nn.Linear(16, 10)  # non-square: input and output scaling differ in size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _random_vector(param: nn.Parameter, seed: int) -> torch.Tensor:
    """Fill an IA³ parameter with U(0.5, 1.5) values; return them flattened."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return param.detach().reshape(-1)


def test_default_selection_is_keys_values_and_ffn_down(zoo) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [IA3Pass()])
    expected = sorted(f"layers.{i}.{s}.ia3_l.default" for i in range(2)
                      for s in ("attn.k_proj", "attn.v_proj", "mlp.down_proj"))
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == expected
    shapes = {n: tuple(p.shape) for n, p in named_trainable_parameters(adapted)}
    assert shapes["layers.0.attn.k_proj.ia3_l.default"] == (64, 1)  # PEFT's (out, 1)
    assert shapes["layers.0.mlp.down_proj.ia3_l.default"] == (1, 256)  # PEFT's (1, in)
    modes = {m.site: (m.mode, m.width) for m in adapted.modules() if isinstance(m, IA3Vector)}
    assert modes["layers.0.attn.k_proj"] == ("output", 64)
    assert modes["layers.0.mlp.down_proj"] == ("input", 256)


def test_feedforward_layer_scales_its_input_and_others_their_output() -> None:
    torch.manual_seed(0)
    model = MLP()
    adapted = apply_passes(model, [IA3Pass(pattern=["up", "down"], feedforward="down")])
    up_l = _random_vector(adapted.get_parameter("up.ia3_l.default"), 1)
    down_l = _random_vector(adapted.get_parameter("down.ia3_l.default"), 2)
    assert adapted.get_parameter("up.ia3_l.default").shape == (16, 1)  # (out_features, 1)
    assert adapted.get_parameter("down.ia3_l.default").shape == (1, 16)  # (1, in_features)
    x = torch.randn(3, 6)
    h = model.up(x) * up_l
    assert torch.equal(adapted(x), model.down(torch.relu(h) * down_l))


def test_role_selection_picks_feed_forward_by_role() -> None:
    adapted = apply_passes(ResidualMLP(), [IA3Pass(role="ffn_down")])  # 6 → 16 → 6
    vec = adapted.get_submodule("down.ia3.default")
    assert vec.mode == "input" and adapted.get_parameter("down.ia3_l.default").shape == (1, 16)
    with pytest.raises(NoMatchError, match="plays role"):  # 6 → 16 → 10 is a head, not a block
        apply_passes(MLP(), [IA3Pass(role="ffn_down")])


def test_feedforward_pattern_must_name_a_selected_layer() -> None:
    with pytest.raises(NoMatchError, match=r"feedforward pattern 'mlp' matches none of the selected layers"):
        apply_passes(MLP(), [IA3Pass(pattern="up", feedforward="mlp")])


def test_invalid_name() -> None:
    with pytest.raises(ConfigError, match=r"IA3Pass: name 'a\.b' contains '\.'.*Way out: "
                                          r"name='a_b'"):
        IA3Pass(name="a.b")
    assert IA3Pass(name="a b").adapter_name == "a b"  # free strings, as in PEFT


def test_gpt2_fused_all_learns_the_whole_qkv_output(zoo) -> None:
    spec = zoo.spec("hf:gpt2")
    adapted = apply_passes(spec.model, [IA3Pass(fused="all")], spec.example_inputs)
    vec = adapted.get_submodule("transformer.h.0.attn.c_attn.ia3.default")
    param = adapted.get_parameter("transformer.h.0.attn.c_attn.ia3_l.default")
    assert vec.parts == [(0, 192)] and param.shape == (192, 1), "as PEFT on c_attn"
    assert IA3Pass.from_config(IA3Pass(fused="all").config()) == IA3Pass(fused="all")
    with pytest.raises(ConfigError, match="IA3Pass: fused must be 'key_value' or 'all'"):
        IA3Pass(fused="qkv")


def test_gpt2_fused_qkv_learns_only_key_and_value(zoo, run_model) -> None:
    spec = zoo.spec("hf:gpt2")
    adapted = apply_passes(zoo.spec("hf:gpt2").model, [IA3Pass()], zoo.spec("hf:gpt2").example_inputs)
    vec = adapted.get_submodule("transformer.h.0.attn.c_attn.ia3.default")
    param = adapted.get_parameter("transformer.h.0.attn.c_attn.ia3_l.default")
    assert vec.mode == "output" and vec.width == 192 and vec.parts == [(64, 128), (128, 192)]
    assert param.shape == (128, 1), "2/3 of c_attn's 192 output features"
    learned = _random_vector(param, 3)
    seen = {}
    hook = vec.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        y = run_model(adapted, spec)
    hook.remove()
    qkv, scaled = seen["inp"], seen["out"]
    assert qkv.shape[-1] == 192
    assert torch.equal(scaled[..., :64], qkv[..., :64]), "the query columns are untouched"
    assert torch.equal(scaled[..., 64:], qkv[..., 64:] * learned), "key and value columns scaled"
    assert not torch.equal(y, run_model(spec.model, spec))
    mlp_vec = adapted.get_submodule("transformer.h.0.mlp.c_proj.ia3.default")
    assert mlp_vec.mode == "input"
    assert adapted.get_parameter("transformer.h.0.mlp.c_proj.ia3_l.default").shape == (1, 128)


@pytest.mark.parametrize("order", ["lora_first", "ia3_first"])
def test_ia3_scales_the_layer_as_adapted_whatever_the_order(order: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    lora = LoRAPass(pattern=["up", "down"], rank=2, alpha=4)
    ia3 = IA3Pass(pattern=["up", "down"], feedforward="down")
    adapted = apply_passes(model, [lora, ia3] if order == "lora_first" else [ia3, lora])
    weights = {}
    for i, (name, mod) in enumerate(sorted(adapted.named_modules())):
        if isinstance(mod, IA3Vector):
            weights[name] = _random_vector(adapted.get_parameter(f"{mod.site}.ia3_l.default"), i)
        elif name.endswith("lora_B.default"):
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
    x = torch.randn(4, 6).double()

    def layer(site: str, h: torch.Tensor) -> torch.Tensor:
        base = model.get_submodule(site)
        a = adapted.get_submodule(f"{site}.lora_A.default").weight.double()
        b = adapted.get_submodule(f"{site}.lora_B.default").weight.double()
        return F.linear(h, base.weight.double(), base.bias.double()) + 2.0 * (h @ a.T @ b.T)

    up_l = weights["up.ia3.default"].double()
    down_l = weights["down.ia3.default"].double()
    want = layer("down", torch.relu(layer("up", x) * up_l) * down_l)
    got = adapted(x.float())
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item()


def test_pattern_selection_still_tells_feed_forward_layers_by_role(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [IA3Pass(pattern="down_proj")])
    vec = adapted.get_submodule("layers.0.mlp.down_proj.ia3.default")
    param = adapted.get_parameter("layers.0.mlp.down_proj.ia3_l.default")
    assert vec.mode == "input" and param.shape == (1, 256), "scales the down projection's input"
    spec = zoo.spec("hf:llama")  # traced with made-up inputs: roles known without any given
    by_role = apply_passes(spec.model, [IA3Pass(pattern="down_proj")])
    assert by_role.get_submodule("model.layers.1.mlp.down_proj.ia3.default").mode == "input"
    with pytest.raises(TraceError, match=r"IA3Pass: telling feed-forward output layers .* "
                                         r"feedforward=\[\.\.\.\] naming them"):
        apply_passes(_Branchy(), [IA3Pass(pattern="down_proj")])  # no map: no roles
    named = apply_passes(_Branchy(), [IA3Pass(pattern="down_proj", feedforward="down_proj")])
    assert named.get_submodule("down_proj.ia3.default").mode == "input"
    assert named.get_parameter("down_proj.ia3_l.default").shape == (1, 16)


class _Branchy(nn.Module):
    """A residual MLP whose forward branches on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.down_proj = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if h.sum() > 0:
            h = h * 2
        return x + self.down_proj(h)


def test_an_empty_feedforward_list_means_no_feed_forward_layer() -> None:
    adapted = apply_passes(MLP(), [IA3Pass(pattern=["up", "down"], feedforward=[])])
    assert {adapted.get_submodule(f"{n}.ia3.default").mode for n in ("up", "down")} == {"output"}
    with pytest.raises(ConfigError, match=r"^IA3Pass: a pattern list must hold at least one"):
        IA3Pass(pattern=[])


def test_peft_state_dict_loads_strictly_both_ways() -> None:
    """Keys and shapes are PEFT's (``up.ia3_l.default`` ``(16, 1)``: output scaling;
    ``down.ia3_l.default`` ``(1, 16)``: a feed-forward layer's input scaling), so PEFT's state
    dict, without ``base_model.model.`` and ``.base_layer``, loads strictly, and ours into
    PEFT's model; the outputs are then PEFT's bit for bit."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = MLP()
    config = peft.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"])
    twin = peft.get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if ".ia3_l." in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    adapted = apply_passes(model, [IA3Pass(pattern=["up", "down"], feedforward="down")])

    def ours(key: str) -> str:
        return key.removeprefix("base_model.model.").replace(".base_layer.", ".")

    theirs = {ours(k): v for k, v in twin.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in adapted.state_dict().items()} == {
        "up.weight": (16, 6), "up.bias": (16,), "up.ia3_l.default": (16, 1),
        "down.weight": (10, 16), "down.bias": (10,), "down.ia3_l.default": (1, 16)}
    assert {k: v.shape for k, v in theirs.items()} == {
        k: v.shape for k, v in adapted.state_dict().items()}
    adapted.load_state_dict(theirs, strict=True)
    x = torch.randn(3, 6)
    assert torch.equal(adapted(x), twin(x))
    assert not torch.equal(adapted(x), model(x))
    other = peft.get_peft_model(copy.deepcopy(model), config)
    mine = adapted.state_dict()
    other.load_state_dict({k: mine[ours(k)] for k in other.state_dict()}, strict=True)
    assert torch.equal(other(x), adapted(x))


def test_several_vectors_on_one_layer_each_a_parameter_named_after_its_adapter() -> None:
    torch.manual_seed(0)
    model = MLP()
    adapted = apply_passes(model, [IA3Pass(pattern="up", name="a"),
                                   IA3Pass(pattern="up", name="test-adapter")])
    assert [(n, tuple(p.shape)) for n, p in named_trainable_parameters(adapted)] == [
        ("up.ia3_l.a", (16, 1)), ("up.ia3_l.test-adapter", (16, 1))]
    first = _random_vector(adapted.get_parameter("up.ia3_l.a"), 1)
    second = _random_vector(adapted.get_parameter("up.ia3_l.test-adapter"), 2)
    x = torch.randn(3, 6)
    assert torch.equal(adapted(x), model.down(torch.relu(model.up(x) * first * second)))
    with pytest.raises(AlreadyAdaptedError, match=r"IA3Pass: up already has an adapter named "
                                                  r"'a' in up\.ia3_l"):
        apply_passes(adapted, [IA3Pass(pattern="up", name="a")])


def test_a_name_the_parameter_slot_cannot_take_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"IA3Pass: adapter name 'pass_name' cannot name a "
                                          r"parameter of up\.ia3_l .*Way out: name=\.\.\."):
        apply_passes(MLP(), [IA3Pass(pattern="up", name="pass_name")])


def test_peft_spellings_are_answered_with_ours() -> None:
    with pytest.raises(ConfigError) as info:
        IA3Pass(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert str(info.value) == (
        "IA3Pass: target_modules=, feedforward_modules=: PEFT's spelling, which IA3Pass does "
        "not take; here target_modules= is pattern=, feedforward_modules= is feedforward=. "
        "Way out: IA3Pass(pattern=['k_proj', 'down_proj'], feedforward=['down_proj']).")


def test_an_unknown_keyword_lists_the_arguments_nearest_first() -> None:
    with pytest.raises(ConfigError, match=r"^IA3Pass: no argument fedforward=; nearest: "
                                          r"feedforward=, "):
        IA3Pass(fedforward="fc2")

"""Tests of passes/ia3.py: default selection, input and output scaling, fused qkv slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import MLP as ResidualMLP
from torch import nn

from passes.modules import IA3Vector
from surgery import (
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


def _random_vector(vec: IA3Vector, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vec.weight.copy_(torch.rand(vec.weight.shape, generator=gen) + 0.5)
    return vec.weight.detach()


def test_default_selection_is_keys_values_and_ffn_down(zoo) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [IA3Pass()])
    expected = sorted(f"layers.{i}.{s}.ia3_l.default.weight" for i in range(2)
                      for s in ("attn.k_proj", "attn.v_proj", "mlp.down_proj"))
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == expected
    modes = {m.site: (m.mode, m.width) for m in adapted.modules() if isinstance(m, IA3Vector)}
    assert modes["layers.0.attn.k_proj"] == ("output", 64)
    assert modes["layers.0.mlp.down_proj"] == ("input", 256)


def test_feedforward_layer_scales_its_input_and_others_their_output() -> None:
    torch.manual_seed(0)
    model = MLP()
    adapted = apply_passes(model, [IA3Pass(pattern=["up", "down"], feedforward="down")])
    up_l = _random_vector(adapted.get_submodule("up.ia3_l.default"), 1)
    down_l = _random_vector(adapted.get_submodule("down.ia3_l.default"), 2)
    assert up_l.shape == (16,) and down_l.shape == (16,)  # up: out_features; down: in_features
    x = torch.randn(3, 6)
    h = model.up(x) * up_l
    assert torch.equal(adapted(x), model.down(torch.relu(h) * down_l))


def test_role_selection_picks_feed_forward_by_role() -> None:
    adapted = apply_passes(ResidualMLP(), [IA3Pass(role="ffn_down")])  # 6 → 16 → 6
    vec = adapted.get_submodule("down.ia3_l.default")
    assert vec.mode == "input" and vec.weight.shape == (16,)
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
    vec = adapted.get_submodule("transformer.h.0.attn.c_attn.ia3_l.default")
    assert vec.parts == [(0, 192)] and vec.weight.shape == (192,), "as PEFT on c_attn"
    assert IA3Pass.from_config(IA3Pass(fused="all").config()) == IA3Pass(fused="all")
    with pytest.raises(ConfigError, match="IA3Pass: fused must be 'key_value' or 'all'"):
        IA3Pass(fused="qkv")


def test_gpt2_fused_qkv_learns_only_key_and_value(zoo, run_model) -> None:
    spec = zoo.spec("hf:gpt2")
    adapted = apply_passes(zoo.spec("hf:gpt2").model, [IA3Pass()], zoo.spec("hf:gpt2").example_inputs)
    vec = adapted.get_submodule("transformer.h.0.attn.c_attn.ia3_l.default")
    assert vec.mode == "output" and vec.width == 192 and vec.parts == [(64, 128), (128, 192)]
    assert vec.weight.shape == (128,), "2/3 of c_attn's 192 output features"
    learned = _random_vector(vec, 3)
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
    mlp_vec = adapted.get_submodule("transformer.h.0.mlp.c_proj.ia3_l.default")
    assert mlp_vec.mode == "input" and mlp_vec.weight.shape == (128,)


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
            weights[name] = _random_vector(mod, i)
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

    up_l = weights["up.ia3_l.default"].double()
    down_l = weights["down.ia3_l.default"].double()
    want = layer("down", torch.relu(layer("up", x) * up_l) * down_l)
    got = adapted(x.float())
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item()


def test_pattern_selection_still_tells_feed_forward_layers_by_role(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = apply_passes(spec.model, [IA3Pass(pattern="down_proj")])
    vec = adapted.get_submodule("layers.0.mlp.down_proj.ia3_l.default")
    assert vec.mode == "input" and vec.weight.shape == (256,), "scales the down projection's input"
    spec = zoo.spec("hf:llama")  # no inputs given: made up from the config to find roles
    by_role = apply_passes(spec.model, [IA3Pass(pattern="down_proj")])
    assert by_role.get_submodule("model.layers.1.mlp.down_proj.ia3_l.default").mode == "input"
    untraceable = _Branchy()  # no inputs can be made up for it, and torch.fx cannot trace it
    with pytest.raises(TraceError, match=r"IA3Pass: telling feed-forward output layers .* "
                                         r"feedforward=\[\.\.\.\] naming them"):
        apply_passes(untraceable, [IA3Pass(pattern="down")])
    named = apply_passes(untraceable, [IA3Pass(pattern="down", feedforward="down")])
    assert named.get_submodule("down.ia3_l.default").mode == "input"


class _Branchy(nn.Module):
    """A feed-forward block whose forward branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        return self.down(h) if h.sum() > 0 else x


def test_an_empty_feedforward_list_means_no_feed_forward_layer() -> None:
    adapted = apply_passes(MLP(), [IA3Pass(pattern=["up", "down"], feedforward=[])])
    assert {adapted.get_submodule(f"{n}.ia3_l.default").mode for n in ("up", "down")} == {"output"}
    with pytest.raises(ConfigError, match=r"^IA3Pass: a pattern list must hold at least one"):
        IA3Pass(pattern=[])

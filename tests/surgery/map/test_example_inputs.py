"""Tests of surgery/map/example_inputs.py: inputs made up for a transformers model's map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import IA3Pass, LoRAPass, TraceError, apply_passes
from surgery.map.example_inputs import NOTE_START, made_up_note, synthesize_inputs

from hf_families import adapted_sites, build


def _shapes(made) -> tuple[list, dict]:
    return ([tuple(a.shape) for a in made.args],
            {k: tuple(v.shape) for k, v in made.kwargs.items()})


def test_token_ids_for_a_causal_lm() -> None:
    made = synthesize_inputs(build("llama"))
    assert made is not None
    (ids,) = made.args
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (1, 8) and made.kwargs == {}
    assert torch.equal(ids, torch.arange(8).unsqueeze(0))  # within the vocabulary of 128
    assert made.note.startswith(NOTE_START) and "input_ids of shape (1, 8)" in made.note


@pytest.mark.parametrize(("family", "args", "kwargs"), [
    ("vit", [(1, 3, 16, 16)], {}),
    ("t5", [(1, 8)], {"decoder_input_ids": (1, 4)}),
    ("bart", [(1, 8)], {"decoder_input_ids": (1, 4)}),
    ("whisper", [(1, 8, 32)], {"decoder_input_ids": (1, 4)}),  # 2 * max_source_positions
])
def test_images_audio_and_decoder_inputs(family: str, args: list, kwargs: dict) -> None:
    made = synthesize_inputs(build(family))
    assert made is not None
    assert _shapes(made) == (args, kwargs)
    if family in ("vit", "whisper"):
        assert made.args[0].dtype == torch.float32


def test_an_image_text_model_gets_its_text_with_the_image_tokens() -> None:
    from surgery.zoo.hf_tiny import IMAGE_TOKEN, QUERY_TOKENS, build_tiny

    model = build_tiny("blip-2").eval()  # forward(pixel_values, input_ids, ...): both required
    made = synthesize_inputs(model)
    assert made is not None
    assert _shapes(made) == ([(1, 3, 32, 32)], {"input_ids": (1, QUERY_TOKENS + 8)})
    ids = made.kwargs["input_ids"]
    assert (ids[0, :QUERY_TOKENS] == IMAGE_TOKEN).all()  # config.image_token_index first
    assert torch.equal(ids[0, QUERY_TOKENS:], torch.arange(8))
    with torch.no_grad():
        assert model(*made.args, **made.kwargs).logits.shape[:2] == (1, QUERY_TOKENS + 8)
    lora = apply_passes(model, [LoRAPass(rank=2)])  # roles found on the made-up inputs
    assert adapted_sites(lora, "lora")


def test_a_required_input_nothing_can_be_made_for() -> None:
    class TwoInputs(nn.Module):
        main_input_name = "input_ids"

        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"vocab_size": 16})()

        def forward(self, input_ids: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
            return input_ids + speaker

    assert synthesize_inputs(TwoInputs()) is None


def test_nothing_is_made_up_for_a_model_without_a_config() -> None:
    assert synthesize_inputs(nn.Linear(4, 4)) is None

    class Odd(nn.Module):
        config = object()
        main_input_name = "inputs_embeds"  # no maker for it

    assert synthesize_inputs(Odd()) is None


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit", "t5", "whisper"])
def test_default_roles_without_example_inputs(family: str) -> None:
    model = build(family)
    lora = apply_passes(model, [LoRAPass(rank=2)])
    assert adapted_sites(lora, "lora")  # found by role: the map was traced
    note = made_up_note(lora._surgery.notes)
    assert note and type(model).__name__ in note
    ia3 = apply_passes(model, [IA3Pass()])
    assert adapted_sites(ia3, "ia3")
    assert made_up_note(ia3._surgery.notes)
    assert model.__dict__.get("_surgery") is None  # the caller's model is not changed


def test_example_inputs_given_always_win() -> None:
    model = build("llama")
    ids = torch.tensor([[5, 6, 7]])
    given = apply_passes(model, [LoRAPass(rank=2)], example_inputs=(ids,))
    assert given._surgery.example_inputs[0] is ids
    assert made_up_note(given._surgery.notes) == ""
    made = apply_passes(model, [LoRAPass(rank=2)])
    assert tuple(made._surgery.example_inputs[0].shape) == (1, 8)
    again = apply_passes(made, [IA3Pass()], example_inputs=(ids,))  # a later call's own
    assert again._surgery.example_inputs[0] is ids
    assert made_up_note(again._surgery.notes) == ""


class Branchy(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.q_proj(x)
        return self.v_proj(x)


def test_where_nothing_can_be_made_up_the_error_stays() -> None:
    with pytest.raises(TraceError, match=r"(?s)LoRAPass.*example_inputs="):
        apply_passes(Branchy(), [LoRAPass(rank=2)])

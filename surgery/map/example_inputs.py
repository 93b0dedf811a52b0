"""Example inputs made up for a transformers model, so its map can be traced without any.

torch.fx cannot trace a Hugging Face transformers model, and torch.export needs inputs. For
a ``PreTrainedModel`` given without ``example_inputs``, :func:`synthesize_inputs` builds the
smallest inputs its forward accepts from ``model.main_input_name`` and its config: token ids
within the vocabulary, an image of the configured size, log-mel features of the configured
length, raw audio long enough for the feature encoder; encoder-decoder models also get
``decoder_input_ids``. The map is only traced with them (never run for results), so their
values do not matter, only their shapes and dtypes.

Duck-typed on ``config`` and ``main_input_name``: the core does not import transformers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["NOTE_START", "SynthesizedInputs", "made_up_note", "synthesize_inputs"]

NOTE_START = "no example_inputs were given: the map of this "
"""How the note on made-up inputs starts (see :func:`made_up_note`)."""

_SEQ_LEN = 8
_DECODER_LEN = 4


@dataclass(frozen=True)
class SynthesizedInputs:
    """Inputs made up for tracing a model's map.

    Attributes:
        args: positional inputs (the main input, when it is the first forward parameter).
        kwargs: keyword inputs (``decoder_input_ids``, or the main input by name).
        note: one sentence for ``SurgeryState.notes`` saying what was made up.
    """

    args: tuple
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""


def _first(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # an unusual config: read the top level
            return config
    return config


def _token_ids(config: Any, length: int, device: torch.device) -> torch.Tensor | None:
    """``(1, length)`` int64 ids ``0, 1, 2, ...`` (modulo the vocabulary), or ``None``."""
    vocab = _first(config, ("vocab_size",))
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    limit = _first(config, ("max_position_embeddings", "n_positions", "max_target_positions"))
    if isinstance(limit, int) and limit > 0:
        length = min(length, limit)
    return (torch.arange(length, device=device) % vocab).unsqueeze(0)


def _image(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``(1, num_channels, height, width)`` zeros of the configured image size, or ``None``."""
    size = _first(config, ("image_size",))
    channels = _first(config, ("num_channels",)) or 3
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) for s in size)):
        return None
    return torch.zeros(1, int(channels), int(size[0]), int(size[1]), dtype=dtype, device=device)


def _features(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``(1, num_mel_bins, 2 * max_source_positions)`` log-mel features (Whisper's encoder
    halves the length with a stride-2 convolution and checks it), or ``None``."""
    bins = _first(config, ("num_mel_bins",))
    positions = _first(config, ("max_source_positions",))
    if not (isinstance(bins, int) and isinstance(positions, int)):
        return None
    return torch.zeros(1, bins, 2 * positions, dtype=dtype, device=device)


def _waveform(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``(1, samples)`` raw audio giving a few frames after the convolutional feature
    encoder (``conv_kernel`` / ``conv_stride``, as wav2vec 2.0), or ``None``."""
    kernels = _first(config, ("conv_kernel",))
    strides = _first(config, ("conv_stride",))
    if not (isinstance(kernels, (list, tuple)) and isinstance(strides, (list, tuple))
            and len(kernels) == len(strides) and kernels):
        return None
    samples = 4  # frames wanted after the encoder
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        samples = (samples - 1) * int(stride) + int(kernel)
    return torch.zeros(1, samples, dtype=dtype, device=device)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _with_image_tokens(ids: torch.Tensor, config: Any) -> torch.Tensor:
    """``ids`` lengthened to hold the image placeholder tokens an image-text model's config
    asks for (``num_query_tokens`` of ``image_token_index``, as BLIP-2), placed first."""
    token = _first(config, ("image_token_index", "image_token_id"))
    count = _first(config, ("num_query_tokens",))
    if not (isinstance(token, int) and isinstance(count, int) and count > 0):
        return ids
    ids = torch.cat([ids.new_full((1, count), token), ids], dim=1)
    return ids


def synthesize_inputs(model: nn.Module) -> SynthesizedInputs | None:
    """Example inputs for a transformers ``PreTrainedModel`` given none, or ``None``.

    The main input (``model.main_input_name``) is one of:

    * ``input_ids``: ``(1, 8)`` int64 (shorter if the model has fewer positions), ids
      ``0, 1, ...`` modulo ``vocab_size``;
    * ``pixel_values``: ``(1, num_channels, image_size, image_size)`` zeros in the model's
      floating dtype;
    * ``input_features``: ``(1, num_mel_bins, 2 * max_source_positions)`` zeros (Whisper);
    * ``input_values``: ``(1, samples)`` zeros, enough samples for four frames after the
      convolutional feature encoder (wav2vec 2.0 and its kin).

    A model whose ``forward`` also requires ``input_ids`` (an image-text model such as
    BLIP-2) gets them too, beginning with the ``num_query_tokens`` image placeholder tokens
    (``image_token_index``) its config names; a model requiring any other input gets
    nothing. An encoder-decoder model (``config.is_encoder_decoder``) also gets
    ``decoder_input_ids`` of ``(1, 4)``. Tensors are put on the device of the model's first parameter.

    Args:
        model: the model, not changed.

    Returns:
        The inputs and a note saying what was made up, or ``None`` when ``model`` is not a
        transformers-style model (no ``config`` / ``main_input_name``) or its main input is
        none of the above (the caller keeps its own error: pass ``example_inputs=``).
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or not isinstance(main, str):
        return None
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    if device.type == "meta":
        device = torch.device("cpu")
    text = _text_config(config)
    makers = {
        "input_ids": lambda: _token_ids(text, _SEQ_LEN, device),
        "pixel_values": lambda: _image(getattr(config, "vision_config", None) or config,
                                       dtype, device),
        "input_features": lambda: _features(config, dtype, device),
        "input_values": lambda: _waveform(config, dtype, device),
    }
    if main not in makers:
        return None
    value = makers[main]()
    if value is None:
        return None
    kwargs: dict[str, torch.Tensor] = {}
    params = _forward_parameters(model)
    required = [p.name for p in params[1:] if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for name in required:  # an image-text model also needs its text (BLIP-2)
        if name == main:
            continue
        if name != "input_ids":
            return None
        ids = _token_ids(text, _SEQ_LEN, device)
        if ids is None:
            return None
        kwargs["input_ids"] = _with_image_tokens(ids, config)
    if getattr(config, "is_encoder_decoder", False):
        decoder = getattr(config, "decoder", None)
        ids = _token_ids(decoder if decoder is not None and hasattr(decoder, "vocab_size")
                         else text, _DECODER_LEN, device)
        if ids is None:
            return None
        kwargs["decoder_input_ids"] = ids
    if params and params[0].name == main:
        args: tuple = (value,)
    else:
        args, kwargs = (), {main: value, **kwargs}
    shapes = [f"{main} of shape {tuple(value.shape)}"] + [
        f"{k} of shape {tuple(v.shape)}" for k, v in kwargs.items() if k != main]
    note = (f"{NOTE_START}{type(model).__name__} was traced "
            f"with made-up inputs ({', '.join(shapes)}, from its config); pass example_inputs= "
            f"(and example_kwargs=) to trace it with your own.")
    return SynthesizedInputs(args=args, kwargs=kwargs, note=note)


def made_up_note(notes: Sequence[str]) -> str:
    """The note of :func:`synthesize_inputs` among ``notes``, or ``""``: tells whether the
    example inputs recorded on an adapted model were made up (a user's own replace them)."""
    return next((n for n in notes if n.startswith(NOTE_START)), "")

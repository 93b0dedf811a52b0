"""Built-in models: small, seeded, offline stand-ins for the architectures surgery targets.

Every model here builds in well under a second on a CPU, downloads nothing and is
deterministic for a given seed. They serve the command line (``surgery ... --model
builtin``), the examples and the tests. This module is their front door: the models are
defined in :mod:`surgery.zoo.models` (hand-written) and :mod:`surgery.zoo.hf` (Hugging Face
transformers), and every public name of both is importable from here.

=====================  =============================================  ============================
spec                   model                                          traced by
=====================  =============================================  ============================
``builtin:tiny``       :class:`TinyTransformer` (alias ``builtin``)   torch.fx, no inputs needed
``builtin:convnet``    :class:`ConvNet`                               torch.fx, no inputs needed
``builtin:encoder``    :func:`transformer_encoder`                    torch.export only
``hf:gpt2``            ``transformers.GPT2LMHeadModel``               torch.export
``hf:llama``           ``transformers.LlamaForCausalLM`` (GQA)        torch.export
``hf:bert``            ``transformers.BertModel``                     torch.export
``hf:vit``             ``transformers.ViTModel``                      torch.export
``hf:<model_type>``    a tiny task model of :mod:`surgery.zoo.hf_tiny` torch.export
=====================  =============================================  ============================

``hf:<model_type>`` covers every architecture of
:func:`surgery.zoo.hf_tiny.tiny_architectures` (``hf:t5``, ``hf:mixtral``, ``hf:swin``, ...)
with its task head (causal, sequence-to-sequence or masked LM, image classifier); the four
names above keep their hand-written models.

Example:
    >>> spec = load_model("builtin")
    >>> spec.model(*spec.example_inputs, **spec.example_kwargs).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.errors import NoMatchError, near_matches
from surgery.zoo.hf import _HF_IMAGE, _HF_VOCAB, hf_bert, hf_gpt2, hf_llama, hf_vit
from surgery.zoo.hf_tiny import registry_entries as _tiny_entries
from surgery.zoo.models import (
    ConvNet,
    TinyAttention,
    TinyBlock,
    TinyConfig,
    TinyMLP,
    TinyTransformer,
    build_attention_mask,
    transformer_encoder,
)

__all__ = [
    "TinyConfig",
    "TinyTransformer",
    "TinyAttention",
    "TinyMLP",
    "TinyBlock",
    "ConvNet",
    "transformer_encoder",
    "build_attention_mask",
    "hf_gpt2",
    "hf_llama",
    "hf_bert",
    "hf_vit",
    "ModelSpec",
    "load_model",
    "available_models",
]

# Example inputs: a batch of 2 sequences of 16 tokens, or 2 images of 3 x 32 x 32.
_BATCH = 2
_SEQ = 16
_IMAGE = 32


@dataclass(frozen=True)
class ModelSpec:
    """A built model with inputs it accepts.

    Attributes:
        name: canonical spec (``"builtin:tiny"``, ``"hf:llama"``, ...).
        model: the model, in evaluation mode.
        example_inputs: positional inputs for ``model(*example_inputs, **example_kwargs)``.
        example_kwargs: keyword inputs (``attention_mask`` for LLaMA and BERT).
        description: one line saying what the model is and what it returns.
    """

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class _Entry:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], _Inputs]
    description: str


def _token_ids(vocab: int, *, mask: bool = False) -> Callable[[torch.Generator], _Inputs]:
    def make(gen: torch.Generator) -> _Inputs:
        ids = torch.randint(0, vocab, (_BATCH, _SEQ), generator=gen)
        kwargs = {"attention_mask": torch.ones(_BATCH, _SEQ, dtype=torch.long)} if mask else {}
        return (ids,), kwargs

    return make


def _floats(*shape: int) -> Callable[[torch.Generator], _Inputs]:
    def make(gen: torch.Generator) -> _Inputs:
        return (torch.randn(*shape, generator=gen),), {}

    return make


_REGISTRY: dict[str, _Entry] = {
    "builtin:tiny": _Entry(
        TinyTransformer,
        _token_ids(TinyConfig().vocab_size),
        "TinyTransformer: 2 pre-LN blocks, d_model 64, 4 heads, vocab 256; "
        "input_ids (2, 16) -> logits (2, 16, 256)",
    ),
    "builtin:convnet": _Entry(
        ConvNet,
        _floats(_BATCH, 3, _IMAGE, _IMAGE),
        "ConvNet: conv-bn-relu x2, pooling, MLP classifier; images (2, 3, 32, 32) -> logits (2, 10)",
    ),
    "builtin:encoder": _Entry(
        transformer_encoder,
        _floats(_BATCH, _SEQ, 64),
        "nn.TransformerEncoder: 2 layers, d_model 64, 4 heads, batch first; "
        "(2, 16, 64) -> (2, 16, 64); torch.fx cannot trace it, torch.export can",
    ),
    "hf:gpt2": _Entry(
        hf_gpt2,
        _token_ids(_HF_VOCAB),
        "transformers GPT2LMHeadModel: 2 layers, hidden 64, 4 heads, vocab 128, Conv1D "
        "projections, tied lm_head; input_ids (2, 16) -> .logits (2, 16, 128)",
    ),
    "hf:llama": _Entry(
        hf_llama,
        _token_ids(_HF_VOCAB, mask=True),
        "transformers LlamaForCausalLM: 2 layers, hidden 64, 4 query / 2 key-value heads, "
        "vocab 128; input_ids (2, 16), attention_mask -> .logits (2, 16, 128)",
    ),
    "hf:bert": _Entry(
        hf_bert,
        _token_ids(_HF_VOCAB, mask=True),
        "transformers BertModel: 2 layers, hidden 64, 4 heads, vocab 128; input_ids (2, 16), "
        "attention_mask -> .last_hidden_state (2, 16, 64), .pooler_output (2, 64)",
    ),
    "hf:vit": _Entry(
        hf_vit,
        _floats(_BATCH, 3, _HF_IMAGE, _HF_IMAGE),
        "transformers ViTModel: 2 layers, hidden 64, 4 heads, 8x8 patches; pixel_values "
        "(2, 3, 32, 32) -> .last_hidden_state (2, 17, 64), .pooler_output (2, 64)",
    ),
}

for _name, (_build, _inputs, _description) in _tiny_entries().items():
    _REGISTRY.setdefault(_name, _Entry(_build, _inputs, _description))

_ALIASES: dict[str, str] = {"builtin": "builtin:tiny"}


def available_models() -> list[str]:
    """Return the canonical specs :func:`load_model` accepts, built-in ones first.

    ``"builtin"`` is accepted too, as an alias of ``"builtin:tiny"``. The ``hf:`` models
    need the ``hf`` extra (``pip install 'fx-surgery[hf]'``).
    """
    return list(_REGISTRY)


def load_model(spec: str, seed: int = 0) -> ModelSpec:
    """Build a model of the zoo with seeded random weights, and inputs for it.

    The weights depend only on ``spec`` and ``seed``: two calls with the same arguments
    give bitwise-equal weights and inputs. The caller's global RNG state is left as it was
    (the model is built inside ``torch.random.fork_rng``). Nothing is downloaded.

    Args:
        spec: one of :func:`available_models`, or ``"builtin"``.
        seed: seeds the weights and the example inputs.

    Returns:
        The model in evaluation mode, with ``example_inputs`` / ``example_kwargs`` that it
        accepts: token ids of shape ``(2, 16)``, or float32 images ``(2, 3, 32, 32)``, or
        float32 hidden states ``(2, 16, 64)`` for ``builtin:encoder``.

    Raises:
        NoMatchError: ``spec`` names no model of the zoo.
        ImportError: an ``hf:`` model was asked for and transformers is not installed.

    Example:
        >>> spec = load_model("hf:llama")          # doctest: +SKIP
        >>> spec.model(*spec.example_inputs, **spec.example_kwargs).logits.shape
        torch.Size([2, 16, 128])
    """
    if not isinstance(spec, str):
        raise TypeError(f"load_model() takes a model name such as 'builtin', got {type(spec).__name__}")
    name = _ALIASES.get(spec.strip(), spec.strip())
    entry = _REGISTRY.get(name)
    if entry is None:
        near = near_matches(spec, [*_REGISTRY, *_ALIASES])
        raise NoMatchError(
            f"no model named {spec!r} in the zoo; nearest known: {', '.join(near)}. "
            f"surgery.zoo.available_models() lists them all; any other model can be passed "
            f"as an nn.Module instead of a name"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build()
    model.eval()
    args, kwargs = entry.inputs(torch.Generator().manual_seed(seed))
    return ModelSpec(
        name=name,
        model=model,
        example_inputs=args,
        example_kwargs=kwargs,
        description=entry.description,
    )

"""Tiny random-weight models of many Hugging Face ``transformers`` architectures.

Each architecture is built from its default configuration (``AutoConfig.for_model``) shrunk
to two layers, hidden size 64, four heads, a vocabulary of 128 and 32 x 32 images, with the
head a fine-tuning user puts on it: a causal LM for decoders, a sequence-to-sequence LM for
encoder-decoders, a masked LM for encoders, an image classifier (2 labels) for vision
models. Configurations name their sizes differently (``n_embd``, ``d_model``, ``dim``...):
:data:`_SHRINK` sets every size field a configuration has, and :data:`TINY_ARCHITECTURES`
holds the few overrides where that is not enough (list-valued sizes, hybrid layer patterns,
multimodal sub-configurations: Gemma 4 is its text-only ``Gemma4ForConditionalGeneration``).
Nothing is downloaded; :func:`surgery.zoo.load_model`
seeds the weights (``hf:<model_type>``).

The architectures are the model types of PEFT's default LoRA target table
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) that
transformers 5 still has, plus common encoders (DistilBERT, ALBERT), vision models (ViT,
CLIP, Swin, ConvNeXt) and mixture-of-experts decoders (Qwen3-MoE, Mixtral, Llama 4). BLIP-2
is the one vision-language model: an image-text-to-text LM whose token ids begin with one
image-placeholder token per query token (4 here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch
from torch import nn

from surgery.errors import NoMatchError, near_matches
from surgery.zoo.hf import import_transformers

__all__ = [
    "TinyArch",
    "TINY_ARCHITECTURES",
    "tiny_architectures",
    "tiny_config",
    "build_tiny",
    "tiny_inputs",
    "tiny_labels",
    "describe_tiny",
]

VOCAB = 128
HIDDEN = 64
IMAGE = 32
BATCH = 2
SEQ = 16
DECODER_SEQ = 8
NUM_LABELS = 2

# Size fields of transformers configurations -> tiny value; set where the default config
# has the field (or an alias of it).
_SHRINK: Mapping[str, Any] = MappingProxyType({
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_decoder_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    # width
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN,
    "word_embed_proj_dim": HIDDEN, "pooler_hidden_size": HIDDEN,
    "attention_hidden_size": HIDDEN, "embedding_size": HIDDEN,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "d_kv": 16,
    "rotary_dim": 8,
    # feed-forward
    "intermediate_size": 128, "n_inner": 128, "d_ff": 128, "ffn_dim": 128,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "hidden_dim": 128,
    "ffn_hidden_size": 128, "intermediate_size_mlp": 128,
    # mixture of experts
    "moe_intermediate_size": 64, "num_local_experts": 4, "num_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 64,
    # vocabulary and positions
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "max_seq_len": 128, "context_length": 128, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    # images
    "image_size": IMAGE, "patch_size": 8,
})

_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                 "sep_token_id", "cls_token_id")

_TASK_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "image-text-lm": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
}

QUERY_TOKENS = 4
IMAGE_TOKEN = VOCAB - 1
"""BLIP-2: the number of query tokens, and the id of the image placeholder token the input
ids begin with (one per query token)."""


@dataclass(frozen=True)
class TinyArch:
    """How to build one tiny architecture.

    Attributes:
        model_type: the name in the zoo (``hf:<model_type>``) and in PEFT's target table.
        task: ``"causal-lm"``, ``"seq2seq-lm"``, ``"masked-lm"``, ``"image-classification"``
            or ``"image-text-lm"``: picks the head class from transformers' auto tables.
        config_type: the configuration's ``model_type`` where it differs (Llama 4's text
            model is ``llama4_text``).
        overrides: configuration fields set after the generic shrink (values may be
            callables of nothing, for nested configurations built on demand).
        moe: the feed-forward experts are fused 3-D parameters (no ``nn.Linear`` to adapt).
    """

    model_type: str
    task: str
    config_type: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    moe: bool = False


def _arch(model_type: str, task: str, **kwargs: Any) -> TinyArch:
    return TinyArch(model_type, task, **kwargs)


_CAUSAL = "causal-lm"
_SEQ2SEQ = "seq2seq-lm"
_MASKED = "masked-lm"
_IMAGE = "image-classification"
_VLM = "image-text-lm"

_VISION_TOWER = {"hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "image_size": IMAGE, "patch_size": 8,
                 "attention_dropout": 0.0}

TINY_ARCHITECTURES: dict[str, TinyArch] = {a.model_type: a for a in [
    # decoders
    _arch("gpt2", _CAUSAL),
    _arch("bloom", _CAUSAL),
    _arch("opt", _CAUSAL, overrides={"enable_bias": True}),
    _arch("gptj", _CAUSAL),
    _arch("gpt_neox", _CAUSAL, overrides={"rotary_pct": 0.5}),
    _arch("gpt_neo", _CAUSAL, overrides={"attention_types": [[["global", "local"], 1]],
                                         "window_size": 8}),
    _arch("llama", _CAUSAL),
    _arch("gpt_bigcode", _CAUSAL),
    _arch("mpt", _CAUSAL, overrides={"expansion_ratio": 2}),
    _arch("falcon", _CAUSAL),
    _arch("codegen", _CAUSAL),
    _arch("mistral", _CAUSAL),
    _arch("stablelm", _CAUSAL),
    _arch("phi", _CAUSAL),
    _arch("gemma", _CAUSAL),
    _arch("gemma2", _CAUSAL, overrides={"sliding_window": 8}),
    _arch("gemma3_text", _CAUSAL, overrides={"sliding_window": 8}),
    _arch("gemma4", _CAUSAL, overrides={"text_config": {
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 16, "max_position_embeddings": 128,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}}),
    _arch("qwen2", _CAUSAL),
    _arch("qwen3", _CAUSAL),
    _arch("rwkv", _CAUSAL),
    _arch("nemotron_h", _CAUSAL, overrides={
        "layers_block_type": ["mamba", "attention", "mlp"],
        "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 16,
        "chunk_size": 16, "expand": 2}),
    # mixture of experts (experts fused into 3-D parameters)
    _arch("mixtral", _CAUSAL, moe=True),
    _arch("qwen3_moe", _CAUSAL, moe=True, overrides={"decoder_sparse_step": 1}),
    _arch("llama4", _CAUSAL, config_type="llama4_text", moe=True,
          overrides={"attention_chunk_size": 8, "no_rope_layer_interval": 2}),
    # encoders
    _arch("bert", _MASKED),
    _arch("roberta", _MASKED, overrides={"pad_token_id": 1}),
    _arch("xlm-roberta", _MASKED, overrides={"pad_token_id": 1}),
    _arch("electra", _MASKED, overrides={"embedding_size": HIDDEN}),
    _arch("deberta", _MASKED),
    _arch("deberta-v2", _MASKED, overrides={"max_relative_positions": 32,
                                            "position_buckets": 16}),
    _arch("distilbert", _MASKED),
    _arch("albert", _MASKED, overrides={"embedding_size": 32}),
    _arch("layoutlm", _MASKED, overrides={"max_2d_position_embeddings": 128}),
    # encoder-decoders
    _arch("t5", _SEQ2SEQ, overrides={"relative_attention_num_buckets": 8,
                                     "decoder_start_token_id": 0}),
    _arch("mt5", _SEQ2SEQ, overrides={"relative_attention_num_buckets": 8,
                                      "decoder_start_token_id": 0}),
    _arch("bart", _SEQ2SEQ),
    # vision-language
    _arch("blip-2", _VLM, overrides={
        "vision_config": dict(_VISION_TOWER),
        "qformer_config": {"hidden_size": HIDDEN, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4,
                           "encoder_hidden_size": HIDDEN, "vocab_size": VOCAB,
                           "max_position_embeddings": 128, "hidden_dropout_prob": 0.0,
                           "attention_probs_dropout_prob": 0.0},
        "text_config": {"model_type": "opt", "hidden_size": HIDDEN, "ffn_dim": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB,
                        "max_position_embeddings": 128, "word_embed_proj_dim": HIDDEN,
                        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
                        "dropout": 0.0},
        "num_query_tokens": QUERY_TOKENS, "image_token_index": IMAGE_TOKEN}),
    # vision
    _arch("vit", _IMAGE),
    _arch("clip", _IMAGE, overrides={"vision_config": dict(_VISION_TOWER),
                                     "text_config": {"hidden_size": HIDDEN,
                                                     "intermediate_size": 128,
                                                     "num_hidden_layers": 2,
                                                     "num_attention_heads": 4,
                                                     "vocab_size": VOCAB, "pad_token_id": 0,
                                                     "bos_token_id": 1, "eos_token_id": 2},
                                     "projection_dim": 32}),
    _arch("swin", _IMAGE, overrides={"patch_size": 4, "embed_dim": 32, "depths": [1, 1],
                                     "num_heads": [2, 4], "window_size": 4,
                                     "drop_path_rate": 0.0}),
    _arch("convnext", _IMAGE, overrides={"patch_size": 4, "num_stages": 2,
                                         "hidden_sizes": [16, 32], "depths": [1, 1]}),
]}
"""model_type -> how to build it; the order is the order of :func:`tiny_architectures`."""


def tiny_architectures() -> list[str]:
    """The model types :func:`build_tiny` builds, decoders first, then MoE decoders,
    encoders, encoder-decoders and vision models."""
    return list(TINY_ARCHITECTURES)


def _arch_of(model_type: str) -> TinyArch:
    arch = TINY_ARCHITECTURES.get(model_type)
    if arch is None:
        near = near_matches(model_type, TINY_ARCHITECTURES)
        raise NoMatchError(
            f"no tiny transformers architecture named {model_type!r}; nearest known: "
            f"{', '.join(near)}. surgery.zoo.hf_tiny.tiny_architectures() lists them all"
        )
    return arch


def _shrunk_fields(default: dict[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """The tiny values of the size, dropout and token fields ``default`` has."""
    names = set(default) | set(aliases)
    kwargs = {k: v for k, v in _SHRINK.items() if k in names
              and not isinstance(default.get(aliases.get(k, k)), list)}
    for key, value in default.items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key in {
                "layerdrop", "drop_path_rate", "encoder_layerdrop", "decoder_layerdrop",
                "router_jitter_noise"}):
            kwargs[key] = 0.0
    for key in _TOKEN_FIELDS:
        value = default.get(key)
        if isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1
        elif isinstance(value, list):
            kwargs[key] = [v if v < VOCAB else VOCAB - 1 for v in value]
    return kwargs


def tiny_config(model_type: str) -> Any:
    """The tiny configuration of ``model_type`` (a ``transformers.PretrainedConfig``).

    Raises:
        NoMatchError: ``model_type`` is not in :data:`TINY_ARCHITECTURES`.
        ImportError: transformers is not installed.
    """
    arch = _arch_of(model_type)
    tf = import_transformers(f"hf:{model_type}")
    config_type = arch.config_type or model_type
    default = tf.AutoConfig.for_model(config_type)
    kwargs = _shrunk_fields(default.to_dict(), getattr(default, "attribute_map", {}))
    kwargs.update(arch.overrides)
    if arch.task == _IMAGE:
        kwargs["num_labels"] = NUM_LABELS
    kwargs["attn_implementation"] = "sdpa" if _supports_sdpa(tf, arch) else "eager"
    return tf.AutoConfig.for_model(config_type, **kwargs)


def _head_class(tf: ModuleType, arch: TinyArch) -> type[nn.Module]:
    from transformers.models.auto import modeling_auto

    table = getattr(modeling_auto, _TASK_MAPPINGS[arch.task])
    name = table.get(arch.config_type or arch.model_type)
    if name is None:
        raise NoMatchError(
            f"transformers has no {arch.task} class for model type {arch.model_type!r}; "
            f"choose another task in surgery.zoo.hf_tiny.TINY_ARCHITECTURES"
        )
    return getattr(tf, name)


def _supports_sdpa(tf: ModuleType, arch: TinyArch) -> bool:
    return bool(getattr(_head_class(tf, arch), "_supports_sdpa", False))


def build_tiny(model_type: str) -> nn.Module:
    """A tiny ``model_type`` model with its task head and random weights, in eval mode.

    Seed the global RNG first for reproducible weights (:func:`surgery.zoo.load_model` does).
    Token models take int64 ``input_ids`` ``(batch, seq)`` below 128 and return ``.logits``
    ``(batch, seq, 128)``; image models take float32 ``pixel_values`` ``(batch, 3, 32, 32)``
    and return ``.logits`` ``(batch, 2)``.

    Raises:
        NoMatchError: ``model_type`` is not in :data:`TINY_ARCHITECTURES`.
        ImportError: transformers is not installed.
    """
    arch = _arch_of(model_type)
    tf = import_transformers(f"hf:{model_type}")
    model = _head_class(tf, arch)(tiny_config(model_type))
    return model.eval()


def tiny_inputs(model_type: str, gen: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs of ``model_type``: ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Token models: ``input_ids`` int64 ``(2, 16)`` drawn from ``gen`` below 128 and an
    all-ones ``attention_mask``; encoder-decoders also ``decoder_input_ids`` ``(2, 8)``;
    image models: ``pixel_values`` float32 ``(2, 3, 32, 32)``; image-text LMs (BLIP-2) both,
    ``pixel_values`` positional (their forward takes it first) and the ids as a keyword,
    beginning with 4 image tokens (id 127).

    Raises:
        NoMatchError: ``model_type`` is not in :data:`TINY_ARCHITECTURES`.
    """
    arch = _arch_of(model_type)
    if arch.task == _IMAGE:
        return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen),), {}
    ids = torch.randint(3, VOCAB - 1, (BATCH, SEQ), generator=gen)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    if arch.task == _SEQ2SEQ:
        kwargs["decoder_input_ids"] = torch.randint(3, VOCAB - 1, (BATCH, DECODER_SEQ),
                                                    generator=gen)
    if arch.task == _VLM:
        ids[:, :QUERY_TOKENS] = IMAGE_TOKEN
        return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen),), {"input_ids": ids,
                                                                       **kwargs}
    return (ids,), kwargs


def tiny_labels(model_type: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
                ) -> dict[str, Any]:
    """Keyword inputs that make ``model_type``'s model return a loss: the example inputs
    with ``labels`` (the input ids for language models, the decoder ids for
    encoder-decoders, class ``[0, 1]`` for images), and ``use_cache=False`` for causal LMs
    (what they use in training). Returns the keyword dict; the positional inputs stay
    ``args``."""
    arch = _arch_of(model_type)
    out = dict(kwargs)
    if arch.task == _IMAGE:
        out["labels"] = torch.arange(BATCH) % NUM_LABELS
    elif arch.task == _SEQ2SEQ:
        out["labels"] = out.pop("decoder_input_ids")
    elif arch.task == _VLM:
        out["labels"] = out["input_ids"]
    else:
        out["labels"] = args[0]
    if arch.task == _CAUSAL:
        out["use_cache"] = False  # as in training: RWKV updates its cached state in place
    return out


def describe_tiny(model_type: str) -> str:
    """One line naming the class, sizes and inputs of ``model_type``'s tiny model
    (without importing transformers)."""
    arch = _arch_of(model_type)
    what = {
        _CAUSAL: "causal LM; input_ids (2, 16), attention_mask -> .logits (2, 16, 128)",
        _SEQ2SEQ: "sequence-to-sequence LM; input_ids (2, 16), attention_mask, "
                  "decoder_input_ids (2, 8) -> .logits (2, 8, 128)",
        _MASKED: "masked LM; input_ids (2, 16), attention_mask -> .logits (2, 16, 128)",
        _IMAGE: "image classifier; pixel_values (2, 3, 32, 32) -> .logits (2, 2)",
        _VLM: "image-text-to-text LM; input_ids (2, 16) beginning with 4 image tokens, "
              "attention_mask, pixel_values (2, 3, 32, 32) -> .logits (2, 16, 128)",
    }[arch.task]
    extra = ", experts fused in 3-D parameters" if arch.moe else ""
    return (f"transformers {arch.config_type or arch.model_type} {what}; 2 layers, "
            f"hidden 64, 4 heads{extra}")


def registry_entries() -> dict[str, tuple[Callable[[], nn.Module],
                                          Callable[[torch.Generator], tuple], str]]:
    """``hf:<model_type>`` -> (build, inputs, description) for :mod:`surgery.zoo`."""
    entries = {}
    for model_type in TINY_ARCHITECTURES:
        entries[f"hf:{model_type}"] = (
            _bind(build_tiny, model_type),
            _bind(tiny_inputs, model_type),
            describe_tiny(model_type),
        )
    return entries


def _bind(fn: Callable[..., Any], model_type: str) -> Callable[..., Any]:
    def bound(*args: Any) -> Any:
        return fn(model_type, *args)

    bound.__name__ = f"{fn.__name__}_{model_type.replace('-', '_')}"
    return bound

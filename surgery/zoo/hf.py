"""Hugging Face ``transformers`` models of the zoo: small configurations, random weights.

Each builder makes a 2-layer model of hidden size 64 from a config, so nothing is
downloaded; transformers itself is imported only when a builder runs, and its absence is
reported with the install command. :func:`surgery.zoo.load_model` seeds the weights.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

__all__ = ["hf_bert", "hf_gpt2", "hf_llama", "hf_vit", "import_transformers"]

# Sizes shared by the builders: two layers, hidden size 64, four heads.
_HF_VOCAB = 128
_HF_HIDDEN = 64
_HF_HEADS = 4
_HF_LAYERS = 2
_HF_FFN = 128
_HF_MAX_POSITIONS = 128
# Side of the square images hf:vit takes, in pixels (8 x 8 patches).
_HF_IMAGE = 32


def import_transformers(spec: str) -> ModuleType:
    """Import transformers for the zoo model ``spec`` (``"hf:gpt2"``), or explain how to
    install it.

    Raises:
        ImportError: transformers is not installed; the message gives the pip command.
    """
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(
            f"model {spec!r} needs the Hugging Face transformers package, which is not "
            f"installed ({e}); install it with: pip install 'fx-surgery[hf]'"
        ) from e


def hf_gpt2() -> nn.Module:
    """A 2-layer ``GPT2LMHeadModel`` with random weights (hidden 64, 4 heads, vocab 128).

    GPT-2 projects with ``transformers.Conv1D`` (weight shape ``(in, out)``) and ties
    ``lm_head.weight`` to ``transformer.wte.weight``. Input: int64 ``input_ids`` ``(batch,
    seq)``, ``seq <= 128``. Output: ``.logits`` float32 ``(batch, seq, 128)``.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = import_transformers("hf:gpt2")
    config = tf.GPT2Config(
        vocab_size=_HF_VOCAB,
        n_positions=_HF_MAX_POSITIONS,
        n_embd=_HF_HIDDEN,
        n_layer=_HF_LAYERS,
        n_head=_HF_HEADS,
        n_inner=_HF_FFN,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=_HF_VOCAB - 1,  # the default, 50256, lies outside this vocabulary
        eos_token_id=_HF_VOCAB - 1,
        attn_implementation="sdpa",
    )
    return tf.GPT2LMHeadModel(config)


def hf_llama() -> nn.Module:
    """A 2-layer ``LlamaForCausalLM`` with grouped-query attention and random weights.

    Hidden 64, 4 query heads sharing 2 key/value heads (``k_proj``/``v_proj`` map 64 to
    32), SwiGLU feed-forward of width 128 (``gate_proj``, ``up_proj``, ``down_proj``),
    RMSNorm, rotary positions, untied ``lm_head``. Input: int64 ``input_ids`` ``(batch,
    seq)`` and optional ``attention_mask`` of the same shape. Output: ``.logits`` float32
    ``(batch, seq, 128)``.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = import_transformers("hf:llama")
    config = tf.LlamaConfig(
        vocab_size=_HF_VOCAB,
        hidden_size=_HF_HIDDEN,
        intermediate_size=_HF_FFN,
        num_hidden_layers=_HF_LAYERS,
        num_attention_heads=_HF_HEADS,
        num_key_value_heads=_HF_HEADS // 2,
        max_position_embeddings=_HF_MAX_POSITIONS,
        attn_implementation="sdpa",
    )
    return tf.LlamaForCausalLM(config)


def hf_bert() -> nn.Module:
    """A 2-layer ``BertModel`` (encoder and pooler) with random weights.

    Hidden 64, 4 heads, feed-forward 128, vocab 128, dropout off. Input: int64
    ``input_ids`` ``(batch, seq)`` and optional ``attention_mask`` of the same shape.
    Output: ``.last_hidden_state`` float32 ``(batch, seq, 64)`` and ``.pooler_output``
    ``(batch, 64)``.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = import_transformers("hf:bert")
    config = tf.BertConfig(
        vocab_size=_HF_VOCAB,
        hidden_size=_HF_HIDDEN,
        num_hidden_layers=_HF_LAYERS,
        num_attention_heads=_HF_HEADS,
        intermediate_size=_HF_FFN,
        max_position_embeddings=_HF_MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return tf.BertModel(config)


def hf_vit() -> nn.Module:
    """A 2-layer ``ViTModel`` on 32 x 32 images in 8 x 8 patches, with random weights.

    Hidden 64, 4 heads, feed-forward 128; 16 patches plus the class token make 17
    positions. Input: float32 ``pixel_values`` ``(batch, 3, 32, 32)``. Output:
    ``.last_hidden_state`` float32 ``(batch, 17, 64)`` and ``.pooler_output`` ``(batch,
    64)``.

    Raises:
        ImportError: transformers is not installed.
    """
    tf = import_transformers("hf:vit")
    config = tf.ViTConfig(
        image_size=_HF_IMAGE,
        patch_size=8,
        num_channels=3,
        hidden_size=_HF_HIDDEN,
        num_hidden_layers=_HF_LAYERS,
        num_attention_heads=_HF_HEADS,
        intermediate_size=_HF_FFN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return tf.ViTModel(config)

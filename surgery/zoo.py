"""Built-in models: small, seeded, offline stand-ins for the architectures surgery targets.

Every model here builds in well under a second on a CPU, downloads nothing and is
deterministic for a given seed. They serve the command line (``surgery ... --model
builtin``), the examples and the tests.

=====================  =============================================  ============================
spec                   model                                          traced by
=====================  =============================================  ============================
``builtin:tiny``       :class:`TinyTransformer` (alias ``builtin``)   torch.fx, no inputs needed
``builtin:convnet``    :class:`ConvNet`                               torch.fx, no inputs needed
``builtin:encoder``    :func:`transformer_encoder`                    torch.export (see below)
``hf:gpt2``            ``transformers.GPT2LMHeadModel``               torch.export
``hf:llama``           ``transformers.LlamaForCausalLM`` (GQA)        torch.export
``hf:bert``            ``transformers.BertModel``                     torch.export
``hf:vit``             ``transformers.ViTModel``                      torch.export
=====================  =============================================  ============================

Example:
    >>> spec = load_model("builtin")
    >>> spec.model(*spec.example_inputs, **spec.example_kwargs).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import ConfigError, NoMatchError, near_matches

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

# Sizes shared by the Hugging Face builders: two layers, hidden size 64, four heads.
_HF_VOCAB = 128
_HF_HIDDEN = 64
_HF_HEADS = 4
_HF_LAYERS = 2
_HF_FFN = 128
_HF_MAX_POSITIONS = 128

# Example inputs: a batch of 2 sequences of 16 tokens, or 2 images of 3 x 32 x 32.
_BATCH = 2
_SEQ = 16
_IMAGE = 32


# --------------------------------------------------------------------------------------
# TinyTransformer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    """Sizes of a :class:`TinyTransformer`.

    Attributes:
        vocab_size: number of token ids; inputs lie in ``[0, vocab_size)``.
        d_model: width of the residual stream.
        n_heads: attention heads; must divide ``d_model``.
        n_layers: number of pre-LayerNorm blocks.
        d_ff: hidden width of each feed-forward block.
        max_len: longest sequence the learned position embedding covers.
        causal: whether each position attends only to itself and earlier positions.

    Raises:
        ConfigError: a size is not a positive integer, or ``n_heads`` does not divide
            ``d_model``.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    max_len: int = 128
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TinyConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"TinyConfig.n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"pick n_heads among {[h for h in range(1, self.d_model + 1) if self.d_model % h == 0]}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads


@torch.fx.wrap
def build_attention_mask(input_ids: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
    """Build the boolean mask :func:`F.scaled_dot_product_attention` takes.

    torch.fx records this function as one ``call_function`` node instead of tracing into
    it, so a model traced without example inputs still honours ``attention_mask`` when one
    is passed at run time.

    Args:
        input_ids: token ids, int64 of shape ``(batch, seq)``; only its sequence length and
            device are read.
        attention_mask: ``(batch, seq)``, bool or integer, 1/True for tokens to keep and
            0/False for padding; or ``None`` when nothing is padded.
        causal: whether query position ``i`` may only see key positions ``j <= i``.

    Returns:
        Bool tensor, True where a query may attend a key: ``(1, 1, seq, seq)`` without an
        ``attention_mask``, ``(batch, 1, seq, seq)`` with one. Every query may attend to its
        own position, so the row of a padded query is never empty (its output is
        meaningless but finite).
    """
    seq = input_ids.shape[1]
    ones = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device)
    mask = torch.tril(ones) if causal else ones
    mask = mask[None, None]
    if attention_mask is not None:
        keep = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        mask = mask & keep[:, None, None, :]
        mask = mask | torch.eye(seq, dtype=torch.bool, device=input_ids.device)
    return mask


class TinyAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections.

    Args:
        config: model sizes.
    """

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.o_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Attend.

        Args:
            x: float ``(batch, seq, d_model)``.
            mask: bool, broadcastable to ``(batch, n_heads, seq, seq)``, True = attend
                (see :func:`build_attention_mask`).

        Returns:
            Float ``(batch, seq, d_model)``.
        """
        batch, seq, d_model = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        # (batch, n_heads, seq, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        y = y.transpose(1, 2).reshape(batch, seq, d_model)
        return self.o_proj(y)


class TinyMLP(nn.Module):
    """Feed-forward block ``down_proj(gelu(up_proj(x)))``.

    Args:
        config: model sizes.
    """

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Float ``(..., d_model)`` to float ``(..., d_model)``."""
        return self.down_proj(self.act(self.up_proj(x)))


class TinyBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Args:
        config: model sizes.
    """

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = TinyAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = TinyMLP(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Float ``(batch, seq, d_model)`` to the same shape; ``mask`` as in :class:`TinyAttention`."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TinyTransformer(nn.Module):
    """A small decoder-only language model, written so torch.fx traces it without inputs.

    Token embedding plus learned position embedding, ``n_layers`` pre-LayerNorm blocks, a
    final LayerNorm and an untied ``lm_head``. Attention is one
    :func:`F.scaled_dot_product_attention` call per block, fed by the ``q_proj``,
    ``k_proj`` and ``v_proj`` linear layers and followed by ``o_proj``. There is no dropout,
    so training and evaluation mode compute the same function.

    Module names: ``embed``, ``pos_embed``, ``layers.{i}.ln_1``,
    ``layers.{i}.attn.{q_proj,k_proj,v_proj,o_proj}``, ``layers.{i}.ln_2``,
    ``layers.{i}.mlp.{up_proj,act,down_proj}``, ``ln_f``, ``lm_head``.

    Weights are drawn from the global torch RNG (normal with std 0.02 for linear and
    embedding weights, zero biases); seed it, or use :func:`load_model`, for reproducible
    weights.

    Args:
        config: model sizes; ``TinyConfig()`` when omitted.

    Example:
        >>> model = TinyTransformer()
        >>> traced = torch.fx.symbolic_trace(model)
        >>> ids = torch.randint(0, 256, (2, 16))
        >>> torch.equal(traced(ids), model(ids))
        True
    """

    def __init__(self, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else TinyConfig()
        cfg = self.config
        self.causal = cfg.causal
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.apply(_init_gpt_style)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Compute next-token logits.

        Args:
            input_ids: int64 ``(batch, seq)`` with values in ``[0, vocab_size)`` and
                ``seq <= max_len``.
            attention_mask: optional ``(batch, seq)``, 1/True = real token, 0/False =
                padding (right padding: positions count from 0 at the first column). Padded
                keys are hidden from every query, on top of the causal mask.

        Returns:
            Float32 logits ``(batch, seq, vocab_size)``.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)
        mask = build_attention_mask(input_ids, attention_mask, self.causal)
        for block in self.layers:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def _init_gpt_style(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------
# ConvNet and nn.TransformerEncoder
# --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """A torchvision-style CNN: two conv-BN-ReLU-maxpool stages, pooling, an MLP head.

    ``features`` = ``Sequential(Conv2d, BatchNorm2d, ReLU, MaxPool2d, Conv2d, BatchNorm2d,
    ReLU, MaxPool2d)``, then ``avgpool`` (adaptive, to 4 x 4), ``torch.flatten`` and
    ``classifier`` = ``Sequential(Linear, ReLU, Dropout, Linear)``. No in-place
    activations, so graph rewrites may read any intermediate tensor.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        width: channels of the first stage; the second has ``2 * width``.
        hidden: width of the classifier's hidden layer.
        dropout: dropout probability in the classifier; 0 by default so training mode is
            deterministic (the ``Dropout`` module is there either way).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Classify.

        Args:
            images: float32 ``(batch, in_channels, height, width)``, e.g. ``(batch, 3, 32, 32)``.

        Returns:
            Float32 logits ``(batch, num_classes)``.
        """
        x = self.features(images)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def transformer_encoder(
    *,
    d_model: int = 64,
    nhead: int = 4,
    num_layers: int = 2,
    dim_feedforward: int = 128,
    batch_first: bool = True,
    dropout: float = 0.0,
) -> nn.TransformerEncoder:
    """Build a stock ``nn.TransformerEncoder`` of post-LayerNorm ``nn.TransformerEncoderLayer``.

    Each layer is initialised independently (``nn.TransformerEncoder`` alone copies one
    layer's initial weights into every layer), and nested tensors are off, so the output is
    always a plain tensor.

    torch.fx cannot trace this model: ``TransformerEncoder.forward`` asks ``src.is_nested``
    (a data-dependent branch) whatever the mode or ``enable_nested_tensor``, and
    ``TransformerEncoderLayer.forward`` branches on ``src.dim()`` and on its mask arguments.
    torch.export (non-strict) traces it in training and evaluation mode, with its attention
    as ``nn.MultiheadAttention`` computing ``F.scaled_dot_product_attention``. In evaluation
    mode under ``torch.no_grad()`` eager PyTorch runs a fused "fast path" kernel instead,
    which agrees with the exported graph only to about 1e-6; with gradients enabled, or
    with ``torch.backends.mha.set_fastpath_enabled(False)``, the two agree bit for bit.

    Args:
        d_model: width of the residual stream.
        nhead: attention heads; must divide ``d_model``.
        num_layers: number of encoder layers.
        dim_feedforward: hidden width of each feed-forward block.
        batch_first: inputs are ``(batch, seq, d_model)`` when True, ``(seq, batch,
            d_model)`` otherwise.
        dropout: dropout probability; 0 by default so training mode is deterministic.

    Returns:
        An ``nn.TransformerEncoder`` mapping float32 ``(batch, seq, d_model)`` to the same
        shape (with ``batch_first=True``), in training mode like any new module.
    """

    def layer() -> nn.TransformerEncoderLayer:
        return nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=batch_first,
        )

    encoder = nn.TransformerEncoder(layer(), num_layers, enable_nested_tensor=False)
    encoder.layers = nn.ModuleList(layer() for _ in range(num_layers))
    return encoder


# --------------------------------------------------------------------------------------
# Hugging Face transformers models (random weights, nothing downloaded)
# --------------------------------------------------------------------------------------


def _transformers(spec: str) -> ModuleType:
    """Import transformers, or explain how to install it."""
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
    tf = _transformers("hf:gpt2")
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
        use_cache=False,
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
    tf = _transformers("hf:llama")
    config = tf.LlamaConfig(
        vocab_size=_HF_VOCAB,
        hidden_size=_HF_HIDDEN,
        intermediate_size=_HF_FFN,
        num_hidden_layers=_HF_LAYERS,
        num_attention_heads=_HF_HEADS,
        num_key_value_heads=_HF_HEADS // 2,
        max_position_embeddings=_HF_MAX_POSITIONS,
        use_cache=False,
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
    tf = _transformers("hf:bert")
    config = tf.BertConfig(
        vocab_size=_HF_VOCAB,
        hidden_size=_HF_HIDDEN,
        num_hidden_layers=_HF_LAYERS,
        num_attention_heads=_HF_HEADS,
        intermediate_size=_HF_FFN,
        max_position_embeddings=_HF_MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_cache=False,
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
    tf = _transformers("hf:vit")
    config = tf.ViTConfig(
        image_size=_IMAGE,
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


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


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
        _floats(_BATCH, 3, _IMAGE, _IMAGE),
        "transformers ViTModel: 2 layers, hidden 64, 4 heads, 8x8 patches; pixel_values "
        "(2, 3, 32, 32) -> .last_hidden_state (2, 17, 64), .pooler_output (2, 64)",
    ),
}

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


"""Hand-written models of the zoo: a tiny decoder-only transformer, a small CNN, and a stock
``nn.TransformerEncoder``.

All three build offline in well under a second and draw their weights from the global
torch RNG; :func:`surgery.zoo.load_model` seeds them. They are importable from
:mod:`surgery.zoo` as well, which is where the rest of the project takes them from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import ConfigError

__all__ = [
    "TinyConfig",
    "TinyTransformer",
    "TinyAttention",
    "TinyMLP",
    "TinyBlock",
    "ConvNet",
    "transformer_encoder",
    "build_attention_mask",
]


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


# fx's generated code and the graph drawings name a wrapped call ``<__module__>.<name>``;
# keep them naming the public import path.
build_attention_mask.__module__ = "surgery.zoo"


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

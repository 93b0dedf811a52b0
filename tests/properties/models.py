"""Hypothesis strategies for small models: MLPs, Conv2d stacks and hand-written transformer
blocks, each with example inputs and the facts about its module tree that pipelines need.

A model is built from drawn parameters only (the seed is drawn too), inside
``torch.random.fork_rng``, so the same draw always gives the same weights and the global
random state is left alone. Every model is in evaluation mode.

Transformer blocks cover: pre-LN and post-LN, ``F.scaled_dot_product_attention`` (with
``is_causal`` or not, grouped-query through ``enable_gqa`` or ``repeat_interleave``) and
eager ``softmax(q k^T / sqrt(d)) v`` attention, plain or gated feed-forward blocks, token
ids through ``nn.Embedding`` or float features through a ``Linear``, a head tied to the
embedding, one ``Linear`` registered under two names, a module called twice, an unused
submodule and custom buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["ModelCase", "cnns", "mlps", "models", "transformers"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class ModelCase:
    """A model in evaluation mode with its example inputs and named parts.

    Attributes:
        model: the model (float32 or bfloat16 weights).
        inputs: positional example inputs (float tensors in the model's dtype, or int64 ids).
        kind: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        description: the drawn parameters, for failure reports.
        linears / convs / embeddings: qualified names of the layers of each kind (every
            name a module is registered under).
        sublayers: names of modules holding linear layers whose forward returns one tensor
            of its input's width (``blocks.0.mlp``).
        attention: names of the modules whose forward holds an attention op.
        param_modules: names of modules holding parameters directly.
        unused: names of modules the forward never calls.
    """

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    kind: str
    description: str
    linears: list[str] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    sublayers: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    param_modules: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"ModelCase({self.description})"

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        """Hypothesis prints falsifying examples with this: the drawn parameters."""
        printer.text(repr(self))  # type: ignore[attr-defined]


def _finish(case: ModelCase) -> ModelCase:
    """Fill ``linears`` / ``convs`` / ``embeddings`` / ``param_modules`` from the tree."""
    for name, mod in case.model.named_modules(remove_duplicate=False):
        if not name:
            continue
        if type(mod) is nn.Linear:
            case.linears.append(name)
        elif type(mod) is nn.Conv2d:
            case.convs.append(name)
        elif type(mod) is nn.Embedding:
            case.embeddings.append(name)
        if any(True for _ in mod.parameters(recurse=False)):
            case.param_modules.append(name)
    case.model.eval()
    return case


# ------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """``layers.i`` Linear + activation, a scale buffer on the input, an unused layer."""

    def __init__(self, widths: list[int], act: str, bias: bool, unused: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.act = _ACTS[act]()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, widths[0]))
        if unused:
            self.unused = nn.Linear(widths[0], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


@st.composite
def mlps(draw: st.DrawFn) -> ModelCase:
    """MLPs of depth 1–3, widths 2–12, any activation, with or without bias."""
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(2, 12), min_size=depth + 1, max_size=depth + 1))
    act = draw(st.sampled_from(sorted(_ACTS)))
    bias = draw(st.booleans())
    unused = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MLP(widths, act, bias, unused).to(dtype)
        x = torch.randn(2, widths[0]).to(dtype)
    desc = (f"mlp widths={widths} act={act} bias={bias} unused={unused} dtype={dtype} "
            f"seed={seed}")
    return _finish(ModelCase(model, (x,), "mlp", desc, unused=["unused"] if unused else []))


# ------------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """``convs.i`` Conv2d + activation, mean pooling, ``head`` Linear."""

    def __init__(self, channels: list[int], kernels: list[int], groups: list[int], act: str,
                 bias: bool, classes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, k, padding=k // 2, groups=g, bias=bias)
            for a, b, k, g in zip(channels, channels[1:], kernels, groups))
        self.act = _ACTS[act]()
        self.head = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.mean(dim=(2, 3)))


@st.composite
def cnns(draw: st.DrawFn) -> ModelCase:
    """Conv2d stacks of depth 1–3 (kernels 1 or 3, groups 1 or 2) and a linear head."""
    depth = draw(st.integers(1, 3))
    channels = [draw(st.sampled_from([1, 2, 3, 4]))]
    kernels, groups = [], []
    for _ in range(depth):
        out = draw(st.sampled_from([2, 4, 6]))
        g = draw(st.sampled_from([1, 2])) if channels[-1] % 2 == 0 else 1
        channels.append(out)
        kernels.append(draw(st.sampled_from([1, 3])))
        groups.append(g)
    act = draw(st.sampled_from(sorted(_ACTS)))
    bias = draw(st.booleans())
    classes = draw(st.integers(2, 5))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CNN(channels, kernels, groups, act, bias, classes).to(dtype)
        x = torch.randn(2, channels[0], 5, 5).to(dtype)
    desc = (f"cnn channels={channels} kernels={kernels} groups={groups} act={act} bias={bias} "
            f"classes={classes} dtype={dtype} seed={seed}")
    return _finish(ModelCase(model, (x,), "cnn", desc))


# ------------------------------------------------------------------------------- transformer


@dataclass(frozen=True)
class BlockConfig:
    """The drawn shape of a transformer block."""

    d: int
    heads: int
    kv_heads: int
    ffn: int
    attention: str  # "sdpa", "sdpa_gqa" (enable_gqa) or "eager"
    causal: bool
    pre_ln: bool
    gated: bool
    bias: bool
    act: str


class Attention(nn.Module):
    """Multi-head attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query
    when ``kv_heads < heads``."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.d // cfg.heads
        self.q_proj = nn.Linear(cfg.d, cfg.heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d, cfg.kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d, cfg.kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.heads * hd, cfg.d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, cfg.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, cfg.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, n, cfg.kv_heads, -1).transpose(1, 2)
        groups = cfg.heads // cfg.kv_heads
        if cfg.attention == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal,
                                               enable_gqa=groups > 1)
        else:
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            if cfg.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)
            else:
                scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                if cfg.causal:
                    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                    scores = scores.masked_fill(~mask, float("-inf"))
                y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``down(act(up(x)))`` or the gated ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.d, cfg.ffn, bias=cfg.bias)
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.d, cfg.ffn, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn, cfg.d, bias=cfg.bias)
        self.act = _ACTS[cfg.act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Attention and feed-forward sub-layers with residuals, pre-LN or post-LN."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.norm1 = nn.LayerNorm(cfg.d)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Transformer(nn.Module):
    """Input (``embed`` Embedding or ``inp`` Linear) + position buffer, ``blocks``, ``head``.

    Options: ``tied`` (``head.weight`` is ``embed.weight``), ``alias`` (``blocks.0.mlp.down_proj``
    also registered as ``shared_down``), ``twice`` (``"mix"``: a Linear called twice before
    the head; ``"block"``: block 0 called twice), ``unused`` (an ``unused`` Linear).
    """

    def __init__(self, cfg: BlockConfig, layers: int, vocab: int, tokens: bool, features: int,
                 seq: int, tied: bool, alias: bool, twice: str, unused: bool) -> None:
        super().__init__()
        if tokens:
            self.embed = nn.Embedding(vocab, cfg.d)
        else:
            self.inp = nn.Linear(features, cfg.d, bias=cfg.bias)
        self.register_buffer("pos", torch.randn(seq, cfg.d) * 0.1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        if twice == "mix":
            self.mix = nn.Linear(cfg.d, cfg.d, bias=cfg.bias)
        self.twice = twice
        self.head = nn.Linear(cfg.d, vocab if tokens else 3, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        if alias:
            self.shared_down = self.blocks[0].mlp.down_proj
        if unused:
            self.unused = nn.Linear(cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if hasattr(self, "embed") else self.inp(x)
        h = h + self.pos  # (seq, d): inputs have exactly seq positions
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == 0 and self.twice == "block":
                h = block(h)
        if self.twice == "mix":
            h = self.mix(self.mix(h))
        return self.head(h)


@st.composite
def block_configs(draw: st.DrawFn) -> BlockConfig:
    """Widths 8 or 16, 1–4 heads, grouped-query where the heads allow it."""
    d = draw(st.sampled_from([8, 16]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return BlockConfig(
        d=d, heads=heads, kv_heads=kv_heads, ffn=draw(st.sampled_from([8, 12, 32])),
        attention=draw(st.sampled_from(["sdpa", "sdpa_gqa", "eager"])),
        causal=draw(st.booleans()), pre_ln=draw(st.booleans()), gated=draw(st.booleans()),
        bias=draw(st.booleans()), act=draw(st.sampled_from(sorted(_ACTS))))


@st.composite
def transformers(draw: st.DrawFn) -> ModelCase:
    """Hand-written transformers of 1–2 blocks (see :class:`Transformer`)."""
    cfg = draw(block_configs())
    layers = draw(st.integers(1, 2))
    tokens = draw(st.booleans())
    tied = tokens and draw(st.booleans())
    alias = draw(st.booleans())
    twice = draw(st.sampled_from(["none", "mix", "block"]))
    unused = draw(st.booleans())
    vocab, features, seq = 11, 5, 4
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(cfg, layers, vocab, tokens, features, seq, tied, alias, twice,
                            unused).to(dtype)
        x = torch.randint(0, vocab, (2, seq)) if tokens else torch.randn(2, seq, features).to(dtype)
    desc = (f"transformer {cfg} layers={layers} tokens={tokens} tied={tied} alias={alias} "
            f"twice={twice} unused={unused} dtype={dtype} seed={seed}")
    case = ModelCase(model, (x,), "transformer", desc, unused=["unused"] if unused else [])
    for i in range(layers):
        case.sublayers += [f"blocks.{i}.mlp", f"blocks.{i}.attn"]
        case.attention.append(f"blocks.{i}.attn")
    return _finish(case)


def models() -> st.SearchStrategy[ModelCase]:
    """Any of :func:`mlps`, :func:`cnns` and :func:`transformers` (half of the draws: most
    passes select attention and feed-forward roles)."""
    return st.one_of(mlps(), cnns(), transformers(), transformers())

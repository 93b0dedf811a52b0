"""The modules :class:`passes.prefix.PrefixPass` inserts (Li & Liang 2021, "Prefix-Tuning:
Optimizing Continuous Prompts for Generation"; Zhang et al. 2023, "LLaMA-Adapter: Efficient
Fine-tuning of Language Models with Zero-init Attention").

- :class:`AttentionPrefix`: learned keys and values ``(heads, P, head_dim)`` of one attention
  op, handed to a rewritten graph or to the transformers attention function
  (:mod:`passes.prefix_hf`) expanded over the batch.
- :class:`MHAPrefix`: learned key and value *inputs* ``(P, embed_dim)`` of an
  ``nn.MultiheadAttention`` (projected by the module itself).
- :class:`SequencePrefix`: ``P`` learned vectors prepended to a sequence ``(B, L, d)``.
- :class:`PrefixEncoder`: the paper's reparameterisation, a small MLP that produces the
  prefix during training; ``eject()`` folds it into plain tensors.
- :class:`PrefixGate`: LLaMA-Adapter's zero-init gate, ``out + g · attn(q, P_k, P_v)``.

Every module honours ``active``: an inactive prefix has length 0 and an inactive gate adds
nothing, so the base model's outputs come back bitwise. A gated prefix is switched by its
gate, so that it has one shape whether active or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passes.prefix_masks import concat_prefix, sequence_dim
from surgery.sites.marker import AdapterModule

__all__ = [
    "AttentionPrefix",
    "LearnedPrefix",
    "MHAPrefix",
    "PrefixEncoder",
    "PrefixGate",
    "SequencePrefix",
]


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation: ``Linear(hidden → out)(tanh(Linear(width → hidden)(E)))``.

    ``E`` is a learned ``(P, width)`` embedding; the output ``(P, out_features)`` holds, per
    prefix position, every learned value of that position (e.g. ``2 · heads · head_dim``:
    keys then values). Training the MLP instead of the prefix itself stabilises
    optimisation; once trained the output is all that is needed (:meth:`LearnedPrefix.eject`).

    Args:
        length: ``P``.
        width: width of the embedding ``E``.
        hidden: hidden width of the MLP.
        out_features: values produced per position.
        dtype, device: of every parameter.
    """

    def __init__(self, length: int, width: int, hidden: int, out_features: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, width, dtype=dtype, device=device))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, dtype=dtype, device=device),
            nn.Tanh(),
            nn.Linear(hidden, out_features, dtype=dtype, device=device),
        )

    def forward(self) -> Tensor:
        """The prefix values, ``(P, out_features)``."""
        return self.mlp(self.embedding)


class LearnedPrefix(AdapterModule):
    """Learned tensors with one position dimension of length ``P``, stored or reparameterised.

    Each part (``"key"``, ``"value"``, ``"vectors"``) is a parameter of its ``shape``,
    whose dimension ``position_dim`` has size ``P``; with ``reparameterize`` the parts are
    produced instead by one :class:`PrefixEncoder` whose output row ``p`` holds position
    ``p`` of every part, in part order.

    Args:
        length: ``P`` (0 allowed: the prefix is then empty).
        shapes: part name → full shape, e.g. ``{"key": (H, P, hd), "value": (H, P, hd)}``.
        position_dim: the dimension of size ``P`` in every shape.
        reparameterize: produce the parts with a :class:`PrefixEncoder`.
        hidden: the encoder's hidden width.
        width: the encoder's embedding width (``None``: the widest part's per-position size).
        init_std: standard deviation of the normal initialisation of stored parts.
        gated: a :class:`PrefixGate` reads this prefix and switches it on and off; the
            prefix itself then keeps its length when inactive (so that its output has one
            shape whether active or not, and per-sample routing selects the gate's output).
        site, adapter_name, role: see :class:`AdapterModule`.
        dtype, device: of every parameter.
    """

    pass_name = "prefix"

    def __init__(self, *, length: int, shapes: Mapping[str, tuple[int, ...]], position_dim: int,
                 reparameterize: bool, hidden: int, width: int | None, init_std: float,
                 site: str, adapter_name: str, role: str | None, dtype: torch.dtype,
                 device: torch.device, gated: bool = False) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.length = length
        self.gated = gated
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.position_dim = position_dim
        self.reparameterize = reparameterize
        self.encoder: PrefixEncoder | None = None
        if reparameterize:
            widths = [math.prod(self._per_position(part)) for part in self.shapes]
            self.encoder = PrefixEncoder(length, width or max(widths), hidden, sum(widths),
                                         dtype=dtype, device=device)
        else:
            for part, shape in self.shapes.items():
                self.register_parameter(part, nn.Parameter(
                    torch.randn(shape, dtype=dtype, device=device) * init_std))

    def _per_position(self, part: str) -> tuple[int, ...]:
        shape = self.shapes[part]
        return shape[:self.position_dim] + shape[self.position_dim + 1:]

    def tensor(self, part: str) -> Tensor:
        """The learned tensor of ``part`` in its full shape (computed when reparameterised)."""
        if self.encoder is None:
            return getattr(self, part)
        out = self.encoder()
        start = 0
        for name in self.shapes:
            rest = self._per_position(name)
            width = math.prod(rest)
            if name == part:
                piece = out[:, start:start + width].reshape(self.length, *rest)
                return piece.movedim(0, self.position_dim)
            start += width
        raise KeyError(part)

    def eject(self) -> None:
        """Fold the reparameterisation into plain learned tensors and drop the encoder.

        The stored tensors are exactly what the encoder produced, so the model's outputs
        are bitwise equal before and after. Does nothing when not reparameterised.
        """
        if self.encoder is None:
            return
        with torch.no_grad():
            values = {part: self.tensor(part).detach().clone().contiguous() for part in self.shapes}
        trains = self.encoder.embedding.requires_grad
        del self.encoder
        self.encoder = None
        for part, value in values.items():
            self.register_parameter(part, nn.Parameter(value, requires_grad=trains))
        self.reparameterize = False

    def _present(self, part: str) -> Tensor:
        """The part, or its zero-length slice when inactive and ungated (or ``P = 0``)."""
        if (not self.active and not self.gated) or self.length == 0:
            shape = list(self.shapes[part])
            shape[self.position_dim] = 0
            ref = self.encoder.embedding if self.encoder is not None else getattr(self, part)
            return ref.new_zeros(shape)
        return self.tensor(part)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}={v}" for k, v in self.shapes.items())
        how = ", reparameterized" if self.encoder is not None else ""
        how += ", gated" if self.gated else ""
        return f"length={self.length}, {shapes}{how}, {super().extra_repr()}"


class AttentionPrefix(LearnedPrefix):
    """Learned keys and values ``(heads, P, head_dim)`` in front of one attention op.

    ``forward(like, part)`` returns the part broadcast over the batch dimensions of
    ``like`` (any 4-D tensor of the attention, e.g. its keys ``(B, H, S, head_dim)``):
    ``(B, heads, P, head_dim)``, or ``(B, heads, head_dim, P)`` with ``transpose`` (to go
    in front of transposed keys ``k^T``), in ``like``'s dtype. Inactive: ``P = 0``.

    ``interface`` names the transformers attention implementation that reads this prefix
    (:mod:`passes.prefix_hf`), ``None`` for a prefix in a rewritten graph; unpickling a
    module with an interface registers that implementation again in the new process.
    """

    def __init__(self, *, length: int, heads: int, head_dim: int, reparameterize: bool = False,
                 hidden: int = 512, init_std: float = 1.0, site: str, adapter_name: str,
                 role: str | None = "attention", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", gated: bool = False,
                 interface: str | None = None) -> None:
        shape = (heads, length, head_dim)
        super().__init__(length=length, shapes={"key": shape, "value": shape}, position_dim=1,
                         reparameterize=reparameterize, hidden=hidden, width=None,
                         init_std=init_std, site=site, adapter_name=adapter_name, role=role,
                         dtype=dtype, device=torch.device(device), gated=gated)
        self.heads = heads
        self.head_dim = head_dim
        self.interface = interface

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.__dict__.get("interface"):
            from passes.prefix_hf import INTERFACE_PREFIX, register_interface

            register_interface(self.interface.removeprefix(INTERFACE_PREFIX))

    def forward(self, like: Tensor, part: str, transpose: bool = False) -> Tensor:
        t = self._present(part).to(like.dtype)
        if self.interface is not None and t.shape[0] != like.shape[-3]:
            raise RuntimeError(
                f"PrefixPass: the prefix at {self.site} holds {t.shape[0]} heads but the "
                f"attention's {part}s have {like.shape[-3]} (shape {tuple(like.shape)}); the "
                f"model's attention layout differs from what its config says. Way out: "
                f"exclude={self.site!r}.")
        out = t.expand(*like.shape[:-3], *t.shape)
        return out.transpose(-1, -2) if transpose else out


class MHAPrefix(LearnedPrefix):
    """Learned key and value *inputs* ``(P, kdim)``, ``(P, vdim)`` of an ``nn.MultiheadAttention``.

    The module projects them with its own ``in_proj`` as it does its other keys and values.
    ``forward(like, part)`` lays the part out as ``like`` (the key or value input):
    ``(B, P, E)`` with ``batch_first``, ``(P, B, E)`` without, ``(P, E)`` unbatched.
    """

    def __init__(self, *, length: int, kdim: int, vdim: int, batch_first: bool,
                 reparameterize: bool = False, hidden: int = 512, init_std: float = 1.0,
                 site: str, adapter_name: str, role: str | None = "attention",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 gated: bool = False) -> None:
        super().__init__(length=length, shapes={"key": (length, kdim), "value": (length, vdim)},
                         position_dim=0, reparameterize=reparameterize, hidden=hidden,
                         width=None, init_std=init_std, site=site, adapter_name=adapter_name,
                         role=role, dtype=dtype, device=torch.device(device), gated=gated)
        self.batch_first = batch_first

    def forward(self, like: Tensor, part: str) -> Tensor:
        t = self._present(part).to(like.dtype)
        if like.dim() == 2:
            return t
        if self.batch_first:
            return t.expand(like.shape[0], *t.shape)
        return t.unsqueeze(1).expand(t.shape[0], like.shape[1], t.shape[1])


class SequencePrefix(LearnedPrefix):
    """``P`` learned vectors ``(P, d)`` prepended to a sequence.

    ``forward(x)``: ``(B, L, d) → (B, P + L, d)`` (``seq_dim=1``), ``(L, B, d) → (P + L, B,
    d)`` (``seq_dim=0``), ``(L, d) → (P + L, d)`` unbatched. Inactive (or ``P = 0``):
    ``x`` itself.
    """

    def __init__(self, *, length: int, width: int, seq_dim: int = 1, reparameterize: bool = False,
                 hidden: int = 512, init_std: float = 1.0, site: str, adapter_name: str,
                 role: str | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(length=length, shapes={"vectors": (length, width)}, position_dim=0,
                         reparameterize=reparameterize, hidden=hidden, width=None,
                         init_std=init_std, site=site, adapter_name=adapter_name, role=role,
                         dtype=dtype, device=torch.device(device))
        self.width = width
        self.seq_dim = seq_dim

    def forward(self, x: Tensor) -> Tensor:
        t = self._present("vectors").to(x.dtype)
        if x.dim() == 2:
            return concat_prefix(t, x, 0)
        if self.seq_dim == 0:
            return concat_prefix(t.unsqueeze(1).expand(t.shape[0], x.shape[1], t.shape[1]), x, 0)
        return concat_prefix(t.expand(x.shape[0], *t.shape), x, 1)


class PrefixGate(AdapterModule):
    """LLaMA-Adapter's zero-init attention gate: ``out + g · attn(q, P_k, P_v)``.

    The prefix gets its own softmax (over the ``P`` prefix positions only, no mask: every
    query sees the whole prefix), and its result is scaled per head by ``g``, a learned
    ``(heads,)`` vector that starts at zero: at init ``out`` comes back bitwise (the
    original attention op is left untouched and ``out + 0 = out``).

    Three kinds:

    - ``"sdpa"``: ``forward(out, q, pk, pv)`` with ``out``, ``q`` ``(B, H, L, hd)`` and
      ``pk``/``pv`` ``(B, H_kv, P, hd)``, attention scale ``scale`` (``None`` =
      ``1/sqrt(hd)``; a ``scale=`` given to ``forward`` wins, as transformers passes its
      ``scaling`` per call), ``enable_gqa`` as the original call.
    - ``"eager"``: as ``"sdpa"``, for ``softmax(q @ k^T · s) @ v`` written out: the scores
      ``q @ P_k^T`` go through the same scalings ``scales`` (``(("mul" | "div", c), ...)``,
      ``c`` a number or a scalar tensor, read at run time) before their softmax.
    - ``"mha"``: ``forward(out, query, pk, pv, params)`` for an ``nn.MultiheadAttention``:
      ``out`` its first output, ``query`` its query input, ``pk``/``pv`` the learned key and
      value inputs laid out like its inputs, ``params`` = ``(in_proj_weight, in_proj_bias,
      q_proj_weight, k_proj_weight, v_proj_weight, out_proj_weight)`` (unused ones
      ``None``). The prefix is projected as the module projects keys and values; the gated
      heads go through ``out_proj``'s weight (its bias is already in ``out``).

    Args:
        heads: number of query heads (one gate each).
        kind: ``"sdpa"``, ``"eager"`` or ``"mha"``.
        scale: attention scale for ``"sdpa"``.
        enable_gqa: for ``"sdpa"``, whether keys have fewer heads than queries.
        batch_first: for ``"mha"``, the module's layout.
    """

    pass_name = "prefix"

    def __init__(self, *, heads: int, kind: str = "sdpa", scale: float | None = None,
                 enable_gqa: bool = False, batch_first: bool = True, site: str,
                 adapter_name: str, role: str | None = "attention",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.heads = heads
        self.kind = kind
        self.scale = scale
        self.enable_gqa = enable_gqa
        self.batch_first = batch_first
        self.weight = nn.Parameter(torch.zeros(heads, dtype=dtype, device=torch.device(device)))

    def forward(self, out: Tensor, q: Tensor, pk: Tensor, pv: Tensor,
                params: tuple[Tensor | None, ...] | None = None,
                scales: tuple[tuple[str, Any], ...] = (), scale: float | None = None) -> Tensor:
        pos = sequence_dim(pk, self.batch_first) if self.kind == "mha" else -2
        if not self.active or pk.shape[pos] == 0:
            return out
        if self.kind == "mha":
            return out + self._mha_term(q, pk, pv, params)
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        if self.kind == "eager":
            scores = q @ pk.transpose(-1, -2)
            for how, c in scales:
                scores = scores * c if how == "mul" else scores / c
            a = torch.softmax(scores, dim=-1) @ pv
        else:
            a = F.scaled_dot_product_attention(q, pk, pv,
                                               scale=self.scale if scale is None else scale,
                                               enable_gqa=self.enable_gqa)
        return out + self.weight.to(a.dtype).view(-1, 1, 1) * a

    def _mha_term(self, query: Tensor, pk: Tensor, pv: Tensor,
                  params: tuple[Tensor | None, ...] | None) -> Tensor:
        if params is None:
            raise ValueError("PrefixGate(kind='mha') needs the attention module's parameters")
        in_w, in_b, q_w, k_w, v_w, out_w = params
        embed = out_w.shape[0]
        if in_w is not None:
            q_w, k_w, v_w = in_w.chunk(3)
        q_b = k_b = v_b = None
        if in_b is not None:
            q_b, k_b, v_b = in_b.chunk(3)
        unbatched = query.dim() == 2

        def batch_major(x: Tensor) -> Tensor:  # -> (B, T, E)
            if unbatched:
                return x.unsqueeze(0)
            return x if self.batch_first else x.transpose(0, 1)

        def heads(x: Tensor) -> Tensor:  # (B, T, E) -> (B, H, T, hd)
            return x.unflatten(-1, (self.heads, embed // self.heads)).transpose(1, 2)

        q = heads(F.linear(batch_major(query), q_w, q_b))
        k = heads(F.linear(batch_major(pk).to(query.dtype), k_w, k_b))
        v = heads(F.linear(batch_major(pv).to(query.dtype), v_w, v_b))
        a = F.scaled_dot_product_attention(q, k, v) * self.weight.to(q.dtype).view(-1, 1, 1)
        y = F.linear(a.transpose(1, 2).flatten(-2), out_w)  # (B, L, E)
        if unbatched:
            return y.squeeze(0)
        return y if self.batch_first else y.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, heads={self.heads}, {super().extra_repr()}"


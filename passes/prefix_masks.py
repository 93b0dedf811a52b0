"""Pure functions that put learned prefix positions in front of keys, values and masks.

:class:`passes.prefix.PrefixPass` calls these from the rewritten graph, so every length is
read from the tensors at run time and the adapted model keeps accepting any batch size and
sequence length. The prefix always goes *first*: key position ``j`` of the original
attention becomes position ``P + j``, and every mask gains ``P`` leading columns in which
every query sees the prefix.

Two mask conventions exist side by side:

- ``"keep"``: boolean ``True`` means *attend* (``F.scaled_dot_product_attention``'s
  ``attn_mask``, ``torch.where(mask, scores, fill)``);
- ``"drop"``: boolean ``True`` means *masked* (``nn.MultiheadAttention``'s
  ``key_padding_mask`` and boolean ``attn_mask``, ``scores.masked_fill(mask, fill)``).

Floating-point masks are additive in both (``0`` = attend, ``-inf`` or the dtype's minimum =
masked), so their prefix columns are ``0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MASK_CONVENTIONS",
    "causal_mask",
    "concat_prefix",
    "concat_sequence",
    "extend_mask",
    "extend_sdpa_mask",
    "extend_sequence_mask",
    "prepend_columns",
    "sequence_dim",
    "visible_value",
]

MASK_CONVENTIONS = ("keep", "drop")


def concat_prefix(prefix: Tensor, x: Tensor, dim: int) -> Tensor:
    """``torch.cat([prefix, x], dim)``, or ``x`` itself when the prefix is empty.

    Returning ``x`` unchanged (the same tensor object) for a zero-length prefix keeps an
    inactive or ``P = 0`` prefix bitwise neutral, including for modules that test inputs
    for identity (``nn.MultiheadAttention``'s fused path checks ``query is key``).

    Args:
        prefix: learned positions, e.g. keys ``(batch, heads, P, head_dim)``.
        x: the tensor they go in front of, same shape except along ``dim``.
        dim: the position (sequence) dimension.

    Returns:
        ``(..., P + S, ...)``, in ``x``'s dtype.
    """
    if prefix.shape[dim] == 0:
        return x
    return torch.cat([prefix.to(x.dtype), x], dim=dim)


def visible_value(mask: Tensor, convention: str) -> bool | float:
    """The mask value that lets a query see a key.

    Args:
        mask: a boolean or floating-point mask.
        convention: ``"keep"`` (boolean ``True`` = attend) or ``"drop"`` (``True`` =
            masked); floating-point masks are additive either way.

    Returns:
        ``True`` / ``False`` for boolean masks, ``0.0`` for additive ones.

    Raises:
        ValueError: ``convention`` is not ``"keep"`` or ``"drop"``.
    """
    if convention not in MASK_CONVENTIONS:
        raise ValueError(f"mask convention must be 'keep' or 'drop', got {convention!r}")
    if mask.dtype == torch.bool:
        return convention == "keep"
    return 0.0


def prepend_columns(mask: Tensor, length: int, key_len: int, convention: str) -> Tensor:
    """Give ``mask`` ``length`` leading key columns in which every query sees the prefix.

    A mask broadcast along the key dimension (last size 1 while there are ``key_len > 1``
    keys) is first expanded to ``key_len`` columns, so that its value still applies to
    every original key and the prefix columns alone are visible. A 0-dimensional mask is
    returned unchanged (it applies to all positions alike).

    Args:
        mask: ``(..., key_len)`` or ``(..., 1)``, boolean or floating point; ``...`` is any
            broadcastable leading shape (``(B or 1, H or 1, L)``, ``(L,)``, ``(B,)``).
        length: number of prefix positions ``P`` (0 returns ``mask`` itself).
        key_len: number of original keys ``S``.
        convention: see :func:`visible_value`.

    Returns:
        ``(..., P + key_len)`` of ``mask``'s dtype, prefix columns first.
    """
    if length == 0 or mask.dim() == 0:
        return mask
    if mask.shape[-1] != key_len:
        mask = mask.expand(*mask.shape[:-1], key_len)
    cols = mask.new_full((*mask.shape[:-1], length), visible_value(mask, convention))
    return torch.cat([cols, mask], dim=-1)


def causal_mask(query_len: int, key_len: int, device: torch.device) -> Tensor:
    """The mask ``is_causal=True`` stands for in ``F.scaled_dot_product_attention``.

    Top-left aligned, as PyTorch defines it: query ``i`` sees keys ``j <= i``.

    Returns:
        Boolean ``(query_len, key_len)``, ``True`` = attend.
    """
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()


def extend_mask(mask: Tensor | None, prefix: Tensor, prefix_dim: int, key: Tensor, key_dim: int,
                convention: str) -> Tensor | None:
    """Extend a key mask by the prefix length; the lengths are read from the tensors.

    Args:
        mask: the mask of the original keys (last dimension = keys), or ``None``.
        prefix: the learned prefix as concatenated, e.g. keys ``(B, H, P, head_dim)``.
        prefix_dim: its position dimension (``-2`` for keys, ``-1`` for transposed keys).
        key: the original keys (before the prefix was added).
        key_dim: their position dimension.
        convention: ``"keep"`` or ``"drop"`` (see the module docstring).

    Returns:
        ``None`` when ``mask`` is ``None``, else ``(..., P + S)`` with the prefix visible.
    """
    if mask is None:
        return None
    return prepend_columns(mask, prefix.shape[prefix_dim], key.shape[key_dim], convention)


def extend_sdpa_mask(mask: Tensor | None, prefix: Tensor, key: Tensor, query: Tensor,
                     is_causal: bool) -> Tensor | None:
    """The ``attn_mask`` of ``F.scaled_dot_product_attention`` once ``P`` keys are prepended.

    With ``is_causal`` the causal mask is built explicitly (the prefix is then visible to
    every query and the causal part among the original keys is unchanged); the call must
    then pass ``is_causal=False``. Without a mask and without ``is_causal`` nothing is
    masked and ``None`` is returned.

    Args:
        mask: boolean (``True`` = attend) or additive mask broadcastable to
            ``(B, H, L, S)``, or ``None``.
        prefix: learned keys ``(B, H, P, head_dim)``.
        key: original keys ``(B, H_kv, S, head_dim)``.
        query: queries ``(B, H, L, head_dim)``.
        is_causal: the call's ``is_causal`` flag.

    Returns:
        A mask broadcastable to ``(B, H, L, P + S)``, or ``None``.
    """
    if is_causal:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.device)
    if mask is None:
        return None
    return prepend_columns(mask, prefix.shape[-2], key.shape[-2], "keep")


def sequence_dim(x: Tensor, batch_first: bool) -> int:
    """The sequence dimension of an ``nn.MultiheadAttention`` input ``x``.

    ``(B, S, E)`` with ``batch_first``, ``(S, B, E)`` without, ``(S, E)`` unbatched.
    """
    return 1 if x.dim() == 3 and batch_first else 0


def concat_sequence(prefix: Tensor, x: Tensor, batch_first: bool) -> Tensor:
    """:func:`concat_prefix` along the sequence dimension of an attention-module input."""
    return concat_prefix(prefix, x, sequence_dim(x, batch_first))


def extend_sequence_mask(mask: Tensor | None, prefix: Tensor, key: Tensor, batch_first: bool,
                         convention: str = "drop") -> Tensor | None:
    """Extend an ``nn.MultiheadAttention`` ``key_padding_mask`` or ``attn_mask`` by ``P``.

    Args:
        mask: ``key_padding_mask`` ``(B, S)`` / ``(S,)`` or ``attn_mask`` ``(L, S)`` /
            ``(B·heads, L, S)``; boolean ``True`` = masked, or additive. ``None`` passes.
        prefix: the learned key inputs laid out like ``key``.
        key: the original key input.
        batch_first: the module's layout.
        convention: ``"drop"`` for ``nn.MultiheadAttention``.

    Returns:
        The mask with ``P`` leading key columns that every query sees, or ``None``.
    """
    if mask is None:
        return None
    dim = sequence_dim(key, batch_first)
    return prepend_columns(mask, prefix.shape[dim], key.shape[dim], convention)

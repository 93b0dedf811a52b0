"""Prefixes in transformers models, through transformers' attention-function interface.

A transformers attention module (``LlamaAttention``, ``GPT2Attention``,
``BertSelfAttention``, ...) computes its queries, keys and values, updates the KV cache,
and then calls the function its config names (``config._attn_implementation``: ``"sdpa"``,
``"eager"``, ...) as ``fn(module, query, key, value, attention_mask, dropout=...,
scaling=..., **kwargs)``. :class:`passes.prefix.PrefixPass` registers, once per base
implementation, a function (:func:`prefix_attention`) that wraps it, and points the adapted
model's config at it::

    config._attn_implementation = "surgery_prefix_sdpa"     # on the adapted copy only

    def prefix_attention(module, q, k, v, mask, **kw):       # k, v: after the cache update
        pk = module.prefix.default(k, "key")                 # (B, H_kv, P, hd)
        pv = module.prefix.default(v, "value")
        k, v = cat([pk, k], -2), cat([pv, v], -2)            # (B, H_kv, P + S, hd)
        mask = P visible columns + mask                      # or causal, built here
        out, w = sdpa_attention_forward(module, q, k, v, mask, **kw)
        out = out + g · attn(q, pk', pv')                    # zero-init gate, if any
        return out, w

The learned keys and values live on the attention module
(``model.layers.0.self_attn.prefix.default.key``, shaped ``(key/value heads, P,
head_dim)``, grouped-query attention included), so the model keeps its class, methods, KV
cache and training behaviour (attention dropout is the base function's). The mask function
of the base implementation is registered under the same name, without which transformers
hands the function no mask at all. Where the mask is ``None`` with several queries (SDPA
relying on ``is_causal``) the function builds the causal mask itself, prefix visible.
Registration is process-wide; a model loaded from a pickle registers again
(:meth:`passes.prefix_modules.AttentionPrefix.__setstate__`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from passes.prefix_masks import causal_mask, concat_prefix, prepend_columns
from surgery.errors import UnsupportedSiteError

__all__ = [
    "BASES",
    "INTERFACE_PREFIX",
    "base_implementation",
    "calls_attention_interface",
    "follow_implementation",
    "interface_modules",
    "kv_layout",
    "prefix_attention",
    "register_interface",
    "switch_implementation",
]

INTERFACE_PREFIX = "surgery_prefix_"
BASES = ("sdpa", "eager")  # base implementations whose masks a prefix can extend


def calls_attention_interface(module: nn.Module) -> bool:
    """True for a transformers attention module that calls the attention-function interface
    (its ``forward`` reads ``ALL_ATTENTION_FUNCTIONS``) and has a ``config``."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return (code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


def interface_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → module, for every module of ``model`` that calls the interface
    (first name of a shared module), in module order."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for qname, mod in model.named_modules():
        if id(mod) not in seen and calls_attention_interface(mod):
            seen.add(id(mod))
            out[qname] = mod
    return out


def _first(*reads: Callable[[], Any]) -> int | None:
    """The first positive int among ``reads``, each called only when the ones before it
    gave none (a config may refuse to answer a global question about a per-layer size)."""
    for read in reads:
        value = read()
        if isinstance(value, int) and value > 0:
            return int(value)
    return None


def _setting(config: Any, name: str) -> Callable[[], Any]:
    """A read of ``config.<name>``: ``None`` when absent, or when the config keeps it per
    layer and refuses a model-wide value (transformers raises a RuntimeError subclass)."""
    def read() -> Any:
        try:
            return getattr(config, name, None)
        except RuntimeError:
            return None
    return read


def _attr(module: nn.Module, name: str) -> Callable[[], Any]:
    return lambda: getattr(module, name, None)


def kv_layout(module: nn.Module, qname: str) -> tuple[int, int, int]:
    """``(key/value heads, head_dim, query heads)`` of a transformers attention module.

    Read from the module's own attributes (``head_dim`` / ``attention_head_size``,
    ``num_heads`` / ``num_attention_heads``, ``num_key_value_groups``), then from its config
    (``head_dim``, ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``).

    Raises:
        UnsupportedSiteError: the sizes cannot be read.
    """
    config = module.config
    heads = _first(_attr(module, "num_heads"), _attr(module, "num_attention_heads"),
                   _setting(config, "num_attention_heads"))
    head_dim = _first(_attr(module, "head_dim"), _attr(module, "attention_head_size"),
                      _setting(config, "head_dim"),
                      lambda: (hidden // heads
                               if (hidden := _first(_setting(config, "hidden_size"))) and heads
                               else None))
    groups = _first(_attr(module, "num_key_value_groups"))
    kv_heads = (heads // groups if heads and groups else
                _first(_setting(config, "num_key_value_heads"), lambda: heads))
    if heads is None or head_dim is None or kv_heads is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot tell the number of heads and the head size of {qname} "
            f"({type(module).__name__}) from its attributes or its config. Way out: "
            f"exclude={qname!r}.")
    return kv_heads, head_dim, heads


@functools.cache
def _eager_function(cls: type) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` the module's own ``forward`` falls back on."""
    forward = inspect.unwrap(cls.forward)
    return getattr(forward, "__globals__", {}).get("eager_attention_forward")


def _base_function(module: nn.Module, base: str) -> Callable[..., Any]:
    if base == "eager":
        fn = _eager_function(type(module))
        if fn is None:
            raise RuntimeError(f"PrefixPass: {type(module).__name__} names no "
                               f"eager_attention_forward to fall back on.")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def register_interface(base: str) -> str:
    """Register the prefix attention function and mask function wrapping ``base``.

    Idempotent, process-wide. Returns the implementation name (``"surgery_prefix_sdpa"``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    name = INTERFACE_PREFIX + base
    AttentionInterface.register(name, functools.partial(prefix_attention, base=base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(module: nn.Module, qname: str) -> str:
    """The implementation a prefix at ``module`` wraps: what its config runs now, or, when an
    earlier prefix already switched it, what that prefix wraps.

    Raises:
        UnsupportedSiteError: the model runs an implementation whose masks a prefix cannot
            extend (flash, flex), or GPT-2's reordered eager attention.
    """
    current = module.config._attn_implementation or "eager"
    base = current.removeprefix(INTERFACE_PREFIX)
    kind = type(module).__name__
    way_out = "Way out: model.set_attn_implementation('sdpa') before adapting it."
    if base not in BASES:
        raise UnsupportedSiteError(
            f"PrefixPass: {qname} ({kind}) runs attention implementation {current!r}; a prefix "
            f"extends the keys, values and masks of 'sdpa' and 'eager' only. {way_out}")
    if base == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        raise UnsupportedSiteError(
            f"PrefixPass: {qname} ({kind}) uses its own reordered eager attention "
            f"(reorder_and_upcast_attn=True), which bypasses the attention interface. {way_out}")
    if base == "eager" and _eager_function(type(module)) is None:
        raise UnsupportedSiteError(
            f"PrefixPass: {qname} ({kind}) has no eager_attention_forward to wrap. {way_out}")
    return base


def switch_implementation(module: nn.Module, base: str) -> str:
    """Point the config ``module`` reads (the adapted copy's own config object, not its
    sub-configs) at the prefix implementation wrapping ``base``; return its name.

    Also registers :func:`follow_implementation` (once) as a forward pre-hook of ``module``,
    so that the prefix survives a later ``set_attn_implementation``.
    """
    name = register_interface(base)
    module.config._attn_implementation_internal = name
    if follow_implementation not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(follow_implementation)
    return name


def follow_implementation(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of an attention module carrying a prefix: keep the prefix in the path.

    ``model.set_attn_implementation("eager")`` (or ``"sdpa"``) after the prefix was added
    points the config back at a plain implementation, which would run the attention
    without the prefix. Before each call this hook points the config at the prefix
    implementation wrapping the one now chosen; the masks the model built for it are the
    same (both names share one mask function). A module whose prefixes were removed is
    left alone.

    Raises:
        UnsupportedSiteError: the implementation chosen is one whose masks a prefix cannot
            extend (flash, flex, ...).
    """
    holder = module._modules.get("prefix")
    current = module.config._attn_implementation or "eager"
    if not holder or current.startswith(INTERFACE_PREFIX):
        return
    qname = next(iter(holder.values())).site
    try:
        base = base_implementation(module, qname)
    except UnsupportedSiteError as exc:
        raise UnsupportedSiteError(
            f"PrefixPass: {qname} ({type(module).__name__}) carries a prefix, but the model's "
            f"attention implementation was switched to {current!r} after the prefix was added, "
            f"and a prefix extends the keys, values and masks of 'sdpa' and 'eager' only. Way "
            f"out: model.set_attn_implementation('sdpa') or model.set_attn_implementation("
            f"'eager'); the prefix follows those switches.") from exc
    switch_implementation(module, base)


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the base function would treat the call as causal (as SDPA decides it)."""
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if flag is None else flag)


def _extended_mask(mask: Tensor | None, length: int, query: Tensor, key: Tensor, base: str,
                   causal: bool) -> Tensor | None:
    """The mask once ``length`` prefix keys are prepended: ``P`` visible leading columns.

    A missing mask stays missing, except for SDPA with several causal queries (it would
    rely on ``is_causal``, top-left aligned): that causal mask is built here.
    """
    if mask is not None:
        return prepend_columns(mask, length, key.shape[-2], "keep")
    if base != "sdpa" or not causal or query.shape[-2] <= 1:
        return None
    return prepend_columns(causal_mask(query.shape[-2], key.shape[-2], query.device), length,
                           key.shape[-2], "keep")


def _extended_biases(kwargs: dict[str, Any], length: int, query: Tensor,
                     key: Tensor) -> dict[str, Any]:
    """``kwargs`` with every additive bias over the keys given ``length`` zero columns.

    A bias is a floating-point tensor of shape ``(..., L, S)`` (``L`` queries, ``S`` keys
    before the prefix), such as T5's relative ``position_bias`` ``(1 or B, H, L, S)``, which
    the base function adds to the scores; ``0`` leaves the prefix columns unbiased.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    out = dict(kwargs)
    for name, val in kwargs.items():
        if (isinstance(val, Tensor) and val.is_floating_point() and val.dim() >= 2
                and val.shape[-1] == k_len and val.shape[-2] == q_len):
            out[name] = prepend_columns(val, length, k_len, "keep")
    return out


def prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, *args: Any, base: str,
                     **kwargs: Any) -> tuple[Tensor, Any]:
    """The attention function registered as ``"surgery_prefix_<base>"``.

    Args:
        module: the attention module (its ``prefix`` and ``prefix_gate`` slots, when present,
            hold :class:`~passes.prefix_modules.AttentionPrefix` and
            :class:`~passes.prefix_modules.PrefixGate` modules by adapter name).
        query: ``(B, H, L, hd)``.
        key, value: ``(B, H_kv, S, hd)``, after the KV-cache update.
        attention_mask: the base implementation's mask, ``(B, 1, L, S)`` boolean (SDPA,
            ``True`` = attend) or additive (eager), or ``None``.
        base: the wrapped implementation (``"sdpa"`` or ``"eager"``).
        *args, **kwargs: passed to the base function (``dropout``, ``scaling``, ...);
            floating-point biases ``(..., L, S)`` among them (T5's ``position_bias``) get
            ``P`` zero leading columns, like additive masks.

    Returns:
        The base function's ``(output (B, L, H, hd), weights)``; with ungated prefixes the
        keys are ``P + S`` long, and every gated prefix adds ``g · attn(q, P_k, P_v)`` to the
        output. A module without prefixes gets exactly the base function's result.
    """
    fn = _base_function(module, base)
    holder = module._modules.get("prefix")
    if holder is None:
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    gates = module._modules.get("prefix_gate") or {}
    keys, values = key, value
    for name, prefix in holder.items():
        if name in gates:
            continue
        keys = concat_prefix(prefix(key, "key"), keys, -2)
        values = concat_prefix(prefix(value, "value"), values, -2)
    added = keys.shape[-2] - key.shape[-2]
    mask = attention_mask
    if added:
        mask = _extended_mask(attention_mask, added, query, key, base, _causal(module, kwargs))
    out, weights = fn(module, query, keys, values, mask, *args,
                      **(_extended_biases(kwargs, added, query, key) if added else kwargs))
    for name, gate in gates.items():  # (B, L, H, hd) out; the gate adds per head
        prefix = holder[name]
        gated = gate(out.transpose(1, 2), query, prefix(key, "key"), prefix(value, "value"),
                     scale=kwargs.get("scaling"))
        out = gated.transpose(1, 2)
    return out, weights

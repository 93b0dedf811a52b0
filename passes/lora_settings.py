"""Per-layer LoRA settings: ranks and alphas keyed by patterns of the selection language.

``LoRAPass(rank=8, rank_for={"v_proj": 16}, alpha_for=[("re:.*\\.0\\..*", 32.0)])``: a
layer takes the value of the first pattern that selects it, else ``rank`` / ``alpha``, as
PEFT's ``rank_pattern`` / ``alpha_pattern`` do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from surgery.errors import ConfigError
from surgery.select import as_patterns, compile_pattern

__all__ = ["PerSite", "scaling_for", "check_rank", "check_alpha", "per_site"]

_V = TypeVar("_V", int, float)
PerSite = Mapping[str, _V] | Sequence[tuple[str, _V]] | None
"""Per-site values keyed by pattern: ``{"q_proj": 16}`` or ``[("q_proj", 16), ...]``."""


def scaling_for(alpha: float, rank: int, use_rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilised LoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def check_rank(value: object) -> str:
    """Why ``value`` is not a rank (``""`` when it is one)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return "" if ok else "a rank must be a positive int"


def check_alpha(value: object) -> str:
    """Why ``value`` is not an alpha (``""`` when it is one)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
    return "" if ok else "an alpha must be a positive finite number"


def per_site(value: object, what: str, check: Callable[[object], str],
              convert: Callable[[object], _V]) -> tuple[tuple[str, _V], ...]:
    """Normalise ``rank_for`` / ``alpha_for`` to a tuple of ``(pattern, value)`` pairs, in
    the order given (a JSON list of ``[pattern, value]`` lists is accepted too), each value
    passed by ``check`` and then ``convert``-ed (``int``, ``float``).

    Raises:
        ConfigError: not a mapping or a sequence of pairs; a pattern that is not a
            non-empty string or not a valid ``re:`` regex; a pattern given twice; a value
            ``check`` refuses.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise ConfigError(
            f"LoRAPass: {what} must be a mapping {{pattern: value}} or a list of (pattern, "
            f"value) pairs, got {value!r}. Way out: e.g. {what}={{'v_proj': 16}}.")
    out: list[tuple[str, _V]] = []
    for key, val in items:
        try:
            if not isinstance(key, str):
                raise ConfigError(f"a pattern must be a string, got {type(key).__name__}")
            as_patterns(key)
            compile_pattern(key)
        except ConfigError as exc:
            raise ConfigError(f"LoRAPass: {what} key {key!r}: {exc}") from None
        if any(key == k for k, _ in out):
            raise ConfigError(f"LoRAPass: {what} gives pattern {key!r} twice; only the first "
                              f"could ever apply. Way out: keep one.")
        why = check(val)
        if why:
            raise ConfigError(f"LoRAPass: {what}[{key!r}]: {why}, got {val!r}. Way out: "
                              f"{what}={{{key!r}: 16}}, or leave {key!r} out for the default.")
        out.append((key, convert(val)))
    return tuple(out)

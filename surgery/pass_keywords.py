"""The check of the keyword arguments a pass is built with, before its ``__init__`` runs.

A keyword the pass does not take raises :class:`surgery.errors.ConfigError` instead of
Python's bare ``TypeError``: PEFT's spelling of a setting (``r=``, ``lora_alpha=``,
``target_modules=``) is answered with ours, from the pass's ``peft_spellings`` table; any
other keyword with the pass's argument names, nearest first.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from surgery.errors import ConfigError, near_matches

__all__ = ["check_keywords"]

_NAMED = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def check_keywords(cls: type, kwargs: Mapping[str, Any], peft: Mapping[str, str]) -> None:
    """Refuse keywords that ``cls.__init__`` does not take.

    Args:
        cls: the pass class being built.
        kwargs: the keyword arguments given to it.
        peft: PEFT's spelling -> the pass's (``{"r": "rank"}``).

    Raises:
        ConfigError: a keyword the pass does not take; the message names the pass, and
            either our spelling of a PEFT setting or the valid names, nearest first.
    """
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items() if p.kind in _NAMED and k != "self"]
    unknown = [k for k in kwargs if k not in valid]
    if not unknown:
        return
    who = cls.__name__
    theirs = [k for k in unknown if k in peft]
    if theirs:
        ours = ", ".join(f"{k}= is {peft[k]}=" for k in theirs)
        fixed = ", ".join(f"{peft[k]}={kwargs[k]!r}" for k in theirs)
        raise ConfigError(
            f"{who}: {', '.join(k + '=' for k in theirs)}: PEFT's spelling, which {who} does "
            f"not take; here {ours}. Way out: {who}({fixed}).")
    lines = [f"{who}: no argument {k}=; nearest: "
             f"{', '.join(m + '=' for m in near_matches(k, valid, n=len(valid)))}"
             for k in unknown]
    raise ConfigError("\n".join(lines) + f"\nWay out: use one of {who}'s keyword arguments "
                      f"(listed nearest first).")

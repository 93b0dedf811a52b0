"""The selection language: one dialect for every pass.

- ``"attn.*"``: a glob over dotted qualified module names, matched against the whole name
  or any suffix that starts at a ``.`` boundary, so ``attn.*`` matches
  ``layers.3.attn.q_proj``. ``*`` and ``?`` stay inside one segment, ``**`` spans segments.
- ``"re:<regex>"``: a Python regex matched with ``fullmatch`` against the whole name.
- A list means any of them; ``exclude=`` removes matches. Every pattern, in a list or in
  ``exclude``, must match something, or :class:`NoMatchError` says which one did not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from surgery.errors import ConfigError, NoMatchError, near_matches

__all__ = ["Selector", "compile_pattern", "matches", "select_names", "as_patterns"]

Selector = str | Sequence[str] | None


def as_patterns(selector: Selector) -> tuple[str, ...]:
    """Normalise ``None`` / a string / a sequence of strings to a tuple of patterns.

    Raises:
        ConfigError: an element is not a non-empty string.
    """
    if selector is None:
        return ()
    items = (selector,) if isinstance(selector, str) else tuple(selector)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"a pattern must be a non-empty string, got {item!r}")
    return items


def _glob_to_regex(glob: str) -> str:
    out = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """Compile one pattern to a predicate on qualified module names.

    Raises:
        ConfigError: the ``re:`` pattern is not a valid regular expression.
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"invalid regular expression in pattern {pattern!r}: {exc}") from exc
        return lambda name: rx.fullmatch(name) is not None
    body = _glob_to_regex(pattern)
    if pattern.startswith("**"):
        rx = re.compile(body)
    else:
        rx = re.compile(rf"(?:.*\.)?{body}")
    return lambda name: rx.fullmatch(name) is not None


def matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` selects the qualified module name ``name``."""
    return compile_pattern(pattern)(name)


def select_names(
    names: Iterable[str],
    pattern: Selector,
    exclude: Selector = None,
    *,
    pass_name: str = "selection",
    all_names: Iterable[str] = (),
    kind: str = "module",
) -> list[str]:
    """Return the names selected by ``pattern`` minus ``exclude``, in input order.

    Args:
        names: candidate qualified names (the sites a pass can adapt).
        pattern: one pattern or a list; ``None`` selects every candidate.
        exclude: patterns removing names from the selection.
        pass_name: used in error messages.
        all_names: every module name of the model, used to explain a pattern that matches
            only modules the pass cannot adapt.
        kind: what the names are, for messages (``"module"``, ``"adapter"``).

    Raises:
        NoMatchError: a pattern (in ``pattern`` or ``exclude``) matches no candidate; the
            message lists up to five nearest candidates and any non-candidate it matched.
    """
    pool = list(dict.fromkeys(names))
    include = as_patterns(pattern)
    excl = as_patterns(exclude)
    if include:
        chosen = []
        for pat in include:
            hit = [n for n in pool if matches(pat, n)]
            if not hit:
                raise _no_match(pat, pool, pass_name, all_names, kind, "pattern")
            chosen.extend(hit)
        chosen_set = set(chosen)
        selected = [n for n in pool if n in chosen_set]
    else:
        selected = list(pool)
    for pat in excl:
        hit = [n for n in selected if matches(pat, n)]
        if not hit:
            raise _no_match(pat, selected, pass_name, all_names, kind, "exclude pattern")
        selected = [n for n in selected if n not in set(hit)]
    return selected


def _no_match(pat: str, pool: list[str], pass_name: str, all_names: Iterable[str], kind: str,
              what: str) -> NoMatchError:
    near = near_matches(pat, pool)
    others = [n for n in all_names if n not in set(pool) and matches(pat, n)]
    lines = [f"{pass_name}: {what} {pat!r} matches no {kind} it can adapt."]
    if others:
        shown = ", ".join(others[:5])
        lines.append(f"It matches only {len(others)} {kind}(s) of a type {pass_name} cannot "
                     f"adapt: {shown}.")
    if near:
        lines.append("Nearest candidates: " + ", ".join(near) + ".")
    else:
        lines.append(f"There are no candidate {kind}s at all.")
    lines.append("Way out: fix the pattern (globs match whole dotted segments, '**' spans "
                 "segments, 're:' takes a regex), or run surgery.list_targets(model) to see "
                 "every candidate.")
    return NoMatchError(" ".join(lines))

"""The selection language: one dialect for every pass.

- ``"attn.*"``: a glob over dotted qualified module names, matched against the whole name
  or any suffix that starts at a ``.`` boundary, so ``attn.*`` matches
  ``layers.3.attn.q_proj``. ``*`` and ``?`` stay inside one segment, ``**`` spans segments
  (as a whole segment, ``a.**.b`` also matches ``a.b``; a trailing ``a.**`` needs at least
  one segment after ``a``).
- ``"re:<regex>"``: a Python regex matched with ``fullmatch`` against the whole name.
- A list means any of them; ``exclude=`` removes matches. Every pattern, in a list or in
  ``exclude``, must match something, or :class:`NoMatchError` says which one did not; so must
  the selection left after ``exclude``. An empty list is a :class:`ConfigError` (``None``
  means "no pattern").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from surgery.errors import ConfigError, NoMatchError, near_matches

__all__ = ["Selector", "compile_pattern", "matches", "first_match", "select_names", "as_patterns",
           "regex_hint"]

Selector = str | Sequence[str] | None


def as_patterns(selector: Selector) -> tuple[str, ...]:
    """Normalise ``None`` / a string / a sequence of strings to a tuple of patterns.

    Raises:
        ConfigError: ``selector`` is neither ``None``, a string nor a list (or tuple, set) of
            strings (``3``, ``True``); it is an empty list; an element is not a non-empty
            string; or a ``re:`` element is not a valid regular expression.
    """
    if selector is None:
        return ()
    if isinstance(selector, str):
        items: tuple = (selector,)
    elif isinstance(selector, (list, tuple, set, frozenset)):
        items = tuple(sorted(selector) if isinstance(selector, (set, frozenset)) else selector)
        if not items:
            raise ConfigError(
                "a pattern list must hold at least one pattern, got an empty list; an empty "
                "list would select nothing. Way out: give patterns, or None for the default "
                "(the pass's default selection, no exclusion).")
    else:
        raise ConfigError(
            f"a pattern must be a string or a list of strings, got {selector!r} "
            f"({type(selector).__name__}). Way out: a glob such as 'attn.*', a list such as "
            f"['q_proj', 'v_proj'], or 're:<regex>'; surgery.list_targets(model) lists the "
            f"names.")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"a pattern must be a non-empty string, got {item!r}. Way out: "
                              f"a glob such as 'attn.*', or None for the default selection.")
        compile_pattern(item)  # an invalid 're:' regex is refused here, where the pass is built
    return items


def _segment_to_regex(segment: str) -> str:
    out = []
    i = 0
    while i < len(segment):
        if segment.startswith("**", i):  # inside a segment: any characters, dots included
            out.append(".*")
            i += 2
            continue
        ch = segment[i]
        out.append(r"[^.]*" if ch == "*" else r"[^.]" if ch == "?" else re.escape(ch))
        i += 1
    return "".join(out)


def _glob_to_regex(glob: str) -> str:
    """Translate a glob to a regex over whole dotted names.

    A segment that is exactly ``**`` stands for any number of whole segments: none when it
    leads or sits between two segments (``a.**.b`` matches ``a.b`` and ``a.x.y.b``), at least
    one when it ends the glob (``a.**`` matches what is inside ``a``, not ``a`` itself).
    """
    raw = glob.split(".")
    segments = [seg for i, seg in enumerate(raw) if not (seg == "**" and i and raw[i - 1] == "**")]
    out = ""
    for i, seg in enumerate(segments):
        first, last = i == 0, i == len(segments) - 1
        if seg == "**":
            if first and last:
                out = ".*"
            elif first:
                out = r"(?:[^.]+\.)*"
            elif last:
                out += r"(?:\.[^.]+)+"
            else:
                out += r"(?:\.[^.]+)*"
            continue
        piece = _segment_to_regex(seg)
        if first or segments[i - 1] == "**" and i == 1:
            out += piece
        else:
            out += r"\." + piece
    return out


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
            raise ConfigError(
                f"invalid regular expression in pattern {pattern!r}: {exc}. Way out: fix the "
                f"regex after 're:' (re.escape(...) quotes a literal name), or use a glob "
                f"such as 'attn.*' without 're:'.") from exc
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


def first_match(patterns: Iterable[str], names: str | Iterable[str]) -> str | None:
    """The first of ``patterns``, in the order given, that selects ``names`` (one qualified
    module name, or every name a shared module sits under: any of them counts); ``None``
    when none does.

    For per-site settings keyed by pattern (``LoRAPass(rank_for={...})``): a site takes
    the value of the first key that selects it, as PEFT's ``rank_pattern`` does.

    Raises:
        ConfigError: a ``re:`` pattern is not a valid regular expression.
    """
    pool = (names,) if isinstance(names, str) else tuple(names)
    for pat in patterns:
        test = compile_pattern(pat)
        if any(test(n) for n in pool):
            return pat
    return None


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
            message lists up to five nearest candidates and any non-candidate it matched. Or
            ``exclude`` removed every name that was selected.
        ConfigError: a pattern is not a string, or a pattern list is empty.
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
    before = list(selected)
    for pat in excl:
        hit = [n for n in selected if matches(pat, n)]
        if not hit:
            raise _no_match(pat, selected, pass_name, all_names, kind, "exclude pattern")
        selected = [n for n in selected if n not in set(hit)]
    if before and not selected:
        shown = ", ".join(before[:5]) + (f", ... ({len(before)} in all)" if len(before) > 5 else "")
        chosen = f"pattern {_show(include)} selected" if include else "was selected"
        raise NoMatchError(
            f"{pass_name}: the selection is empty after exclude={_show(excl)}: "
            f"it removed every {kind} that {chosen} ({shown}). Way out: narrow "
            f"exclude, or widen the pattern"
            + ("; surgery.list_targets(model) lists every candidate." if kind == "module" else "."))
    return selected


def _show(patterns: tuple[str, ...]) -> str:
    """One pattern as its repr, several as a list."""
    return repr(list(patterns)) if len(patterns) > 1 else repr(patterns[0])


_REGEX_SYNTAX = re.compile(r"\\|[()|\[\]^$+]|^\.\*|\.\*[^.*]")
"""What reads as regex, not glob: ``\\ ( ) | [ ] ^ $ +``, and ``.*`` at the start or before
anything but a dot (``attn.*`` and ``layers.*.q_proj`` are globs)."""


def regex_hint(pat: str, pool: list[str], kind: str) -> str:
    """The sentence suggesting ``re:<pat>`` for a glob that looks like a regex (``pool``: the
    candidate names, ``kind``: what they are), or ``""``."""
    if pat.startswith("re:") or not _REGEX_SYNTAX.search(pat):
        return ""
    try:
        rx = re.compile(pat)
    except re.error:
        return ""
    hits = sum(1 for n in pool if rx.fullmatch(n))
    found = f"; as a regex it matches {hits} {kind}(s) it can adapt" if hits else ""
    return (f"The pattern contains regex syntax but is read as a glob: did you mean "
            f"'re:{pat}' (a regex, matched against the whole name){found}?")


def _no_match(pat: str, pool: list[str], pass_name: str, all_names: Iterable[str], kind: str,
              what: str) -> NoMatchError:
    near = near_matches(pat, pool)
    others = [n for n in all_names if n not in set(pool) and matches(pat, n)]
    lines = [f"{pass_name}: {what} {pat!r} matches no {kind} it can adapt."]
    if others:
        shown = ", ".join(others[:5])
        hint = ("" if pat.startswith("re:") or kind != "module"
                else f" (the layers inside them: '{pat}.**')")
        lines.append(f"It matches only {len(others)} {kind}(s) that {pass_name} cannot adapt: "
                     f"{shown}{hint}.")
    hint = regex_hint(pat, pool, kind)
    if hint:
        lines.append(hint)
    if "" in pool:  # the model is itself one layer: its name is empty
        lines.append("The only candidate is the model itself, a single layer: select it with "
                     "pattern='*'.")
    elif near:
        lines.append("Nearest candidates: " + ", ".join(near) + ".")
    else:
        lines.append(f"There are no candidate {kind}s at all.")
    lines.append("Way out: fix the pattern (globs match whole dotted segments, '**' spans "
                 "segments, 're:' takes a regex), or run surgery.list_targets(model) to see "
                 "every candidate.")
    return NoMatchError(" ".join(lines))

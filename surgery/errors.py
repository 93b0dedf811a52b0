"""The typed error family of fx-surgery.

Every error raised on bad user input derives from :class:`SurgeryError` and from the
builtin exception a Python user would expect (``ValueError``, ``KeyError``, ``RuntimeError``),
so ``except ValueError`` keeps working. Messages name the offending thing, show what was
there instead, and give the way out.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = [
    "SurgeryError",
    "TraceError",
    "NoMatchError",
    "ConfigError",
    "InputTypeError",
    "AlreadyAdaptedError",
    "UnsupportedSiteError",
    "MergeError",
    "AdapterNotFoundError",
    "RenderError",
    "CheckpointError",
    "near_matches",
    "few",
]


class SurgeryError(Exception):
    """Base class of every error fx-surgery raises on purpose."""


class TraceError(SurgeryError, RuntimeError):
    """A model could be traced by neither front end (torch.fx nor torch.export)."""


class NoMatchError(SurgeryError, ValueError):
    """A selection (pattern, role, adapter name) matched nothing."""


class ConfigError(SurgeryError, ValueError):
    """A pass or function was configured with an invalid value."""


class InputTypeError(ConfigError, TypeError):
    """An argument of the wrong type where a model (or another object) was expected; both
    ``except ValueError`` (as a :class:`ConfigError`) and ``except TypeError`` catch it."""


class AlreadyAdaptedError(SurgeryError, ValueError):
    """A site already carries an adapter of the same pass and name."""


class UnsupportedSiteError(SurgeryError, TypeError):
    """A selected module has a type the pass cannot adapt."""


class MergeError(SurgeryError, RuntimeError):
    """A merge or unmerge was asked for in a state that does not allow it."""


class AdapterNotFoundError(SurgeryError, KeyError):
    """An adapter name that the model does not carry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RenderError(SurgeryError, RuntimeError):
    """A graph could not be rendered to an image."""


class CheckpointError(SurgeryError, ValueError):
    """An adapter checkpoint (ours or PEFT's) that cannot be read, does not fit the model,
    or holds what cannot be expressed; nothing was loaded."""


def near_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates closest to ``word``, best first.

    Closeness is difflib's ratio on the whole string, then on the last dotted segment, so
    ``"attn.qproj"`` finds ``"layers.0.attn.q_proj"``.
    """
    pool: Sequence[str] = sorted(set(candidates))
    if not pool:
        return []
    scored = []
    tail = word.rsplit(".", 1)[-1].strip("*")
    for cand in pool:
        whole = difflib.SequenceMatcher(None, word, cand).ratio()
        last = difflib.SequenceMatcher(None, tail, cand.rsplit(".", 1)[-1]).ratio()
        scored.append((-(max(whole, last) + 0.5 * min(whole, last)), cand))
    scored.sort()
    return [cand for _, cand in scored[:n]]


def few(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` joined by commas, then how many more there are."""
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")

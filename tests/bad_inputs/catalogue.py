"""The case record of the bad-input catalogue and the one check every case goes through."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from surgery.errors import SurgeryError

WAY_OUT = r"Way out|[Nn]earest|Valid |one of |present|it holds|it has|must be '[^']+' or '"
"""What every message must offer: the way out, or the valid or nearest choices."""


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: the test id.
        model: builds the model the call is given (a fresh one per case).
        call: ``call(model, tmp_path)`` makes the bad call.
        error: the :class:`SurgeryError` subclass it must raise (exactly that class).
        says: regexes the message must contain (the pass or function, the bad value).
        gap: why the case is known to fail today (it is then a strict ``xfail``).
    """

    id: str
    model: Callable[[], nn.Module]
    call: Callable[[nn.Module, Path], Any]
    error: type[SurgeryError]
    says: tuple[str, ...]
    gap: str = ""


def params(cases: list[Case]) -> list[Any]:
    """``cases`` for ``pytest.mark.parametrize``, by id; a case with a ``gap`` is a strict
    ``xfail`` (it must start passing once the gap is closed)."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.gap, strict=True)]
                         if c.gap else []) for c in cases]


def files_under(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (``None`` for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def structure(model: nn.Module) -> dict[str, Any]:
    """What can be compared on a model whose tensors hold no values (the meta device):
    every submodule and parameter object, its type, ``training`` and ``requires_grad``."""
    return {"modules": [(n, m, type(m), m.training) for n, m in model.named_modules()],
            "params": [(n, p, p.requires_grad, p.shape, p.device)
                       for n, p in model.named_parameters()],
            "history": len(getattr(getattr(model, "_surgery", None), "history", ()))}


def check_case(case: Case, tmp_path: Path, snapshot: Callable[[nn.Module], Any],
               existing: Callable[[Path], None] | None = None) -> SurgeryError:
    """Run ``case`` and check that it raises ``case.error`` (a :class:`SurgeryError`, never a
    bare builtin from inside torch) with the expected message, leaves the model unchanged
    and leaves the files under ``tmp_path`` as they were (after ``existing(tmp_path)``,
    which may put a checkpoint there first)."""
    assert issubclass(case.error, SurgeryError)
    model = case.model()
    if existing is not None:
        existing(tmp_path)
    files = files_under(tmp_path)
    on_meta = any(p.is_meta for p in model.parameters())
    before = structure(model) if on_meta else snapshot(model)
    with pytest.raises(SurgeryError) as info:
        case.call(model, tmp_path)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for pattern in case.says:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert re.search(WAY_OUT, message), f"no way out in: {message}"
    if on_meta:
        assert structure(model) == before, "the meta-device model changed"
    else:
        before.assert_unchanged(model)
    assert files_under(tmp_path) == files, "a file or folder was written, changed or removed"
    return info.value

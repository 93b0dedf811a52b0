"""The :class:`TraceError` raised when neither front end can trace a model.

The message names, for each front end, the exception, the user source line that broke
tracing (the innermost frame outside torch and this package), the module whose ``forward``
holds that line, and the way out.
"""

from __future__ import annotations

import inspect
import os
import traceback

import torch
from torch import nn

from surgery.errors import TraceError

__all__ = ["trace_error"]


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    ours = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(torch_dir) or path.startswith(ours + os.sep):
            continue
        if "<" in frame.filename:  # generated code
            continue
        return frame
    return frames[-1] if frames else None


def _failing_module(model: nn.Module, frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return type(model).__name__
    for name, mod in model.named_modules():
        fwd = type(mod).forward
        try:
            code = fwd.__code__
        except AttributeError:
            continue
        if (os.path.abspath(code.co_filename) == os.path.abspath(frame.filename)
                and frame.name == "forward"):
            try:
                lines = inspect.getsourcelines(fwd)
            except (OSError, TypeError):  # no source (defined in a REPL or exec'd)
                continue
            if lines[1] <= (frame.lineno or 0) < lines[1] + len(lines[0]):
                return f"{name or '<root>'} ({type(mod).__name__})"
    return type(model).__name__


def _describe(exc: BaseException | None, model: nn.Module) -> str:
    if exc is None:
        return "not tried"
    frame = _user_frame(exc)
    where = ""
    if frame is not None:
        where = f"\n    at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}{where}\n    in module {_failing_module(model, frame)}"


def trace_error(model: nn.Module, fx_exc: BaseException | None,
                export_exc: BaseException | None, no_inputs: bool) -> TraceError:
    """Build the error for a model that could not be traced.

    Args:
        model: the model given to :func:`surgery.map.trace`.
        fx_exc: what the torch.fx front end raised, or ``None`` if it was not tried.
        export_exc: what the torch.export front end raised, or ``None`` if not tried.
        no_inputs: export was not tried because no example inputs were given.

    Returns:
        The :class:`TraceError` to raise (``from`` the last exception).
    """
    lines = [f"could not trace {type(model).__name__}."]
    lines.append(f"  torch.fx: {_describe(fx_exc, model)}")
    if no_inputs:
        lines.append("  torch.export: not tried, because no example_inputs were given.")
        lines.append(
            "Way out: pass example_inputs=(...) (and example_kwargs={...} for keyword inputs) "
            "so torch.export can trace the model, or name the module that breaks tracing in "
            "leaf_modules=[...] to keep it opaque."
        )
    else:
        lines.append(f"  torch.export: {_describe(export_exc, model)}")
        lines.append(
            "Way out: name the module that breaks tracing in leaf_modules=[...] to keep it "
            "opaque, or check that example_inputs/example_kwargs run the model eagerly."
        )
    return TraceError("\n".join(lines))

"""Reading and writing checkpoint files: tensors in safetensors, settings in JSON.

Nothing here unpickles: a safetensors file holds raw tensor bytes and a JSON header, so
loading a checkpoint never runs code from it. A file that cannot be read (missing,
truncated, not safetensors, not JSON) raises :class:`~surgery.errors.CheckpointError`
naming the file. Writes go to a temporary file in the same directory first and replace the
target only once complete, so a failed save never leaves a half-written file in place of a
good one; :func:`write_together` writes every file of a checkpoint that way before
replacing any, so a save that fails leaves the checkpoint that was there whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from surgery.errors import CheckpointError

__all__ = ["read_tensors", "tensor_headers", "write_tensors", "read_json", "write_json",
           "checkpoint_dir", "Writer", "tensors_writer", "json_writer", "write_together"]

Writer = Callable[[str], None]
"""Writes one file's content to the path it is given (a temporary file beside the target)."""


def checkpoint_dir(directory: str | os.PathLike[str], who: str, *, must_exist: bool) -> Path:
    """``directory`` as a :class:`Path`, checked.

    Raises:
        CheckpointError: ``must_exist`` and it is not a directory, or it is a file.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{who}: {str(path)!r} is a file, not a directory; a checkpoint is "
                              f"a directory holding the tensors and the settings. Way out: "
                              f"give a directory ({str(path.parent)!r}, or a new folder).")
    if must_exist and not path.is_dir():
        raise CheckpointError(f"{who}: there is no directory {str(path)!r}. Way out: the "
                              f"directory given to save_adapters / export_peft.")
    return path


def read_tensors(path: Path, who: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, on the CPU, in its stored dtype, each
    in storage of its own: the file's buffer places tensors at any byte offset, and kernels
    (oneDNN convolutions) round differently on storage that is not aligned.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    _exists(path, who)
    try:
        return {key: value.clone() for key, value in load_file(str(path), device="cpu").items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{who}: {str(path)!r} is not a readable safetensors file "
                              f"({exc}); it may be truncated or corrupt. Nothing was loaded. "
                              f"Way out: save it again.") from None


def tensor_headers(path: Path, who: str) -> dict[str, tuple[list[int], str]]:
    """``key -> (shape, dtype name)`` of every tensor in the safetensors file ``path``, read
    from its header only (no tensor data is loaded).

    Raises:
        CheckpointError: the file is missing or not a safetensors file.
    """
    _exists(path, who)
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                part = f.get_slice(key)
                out[key] = (list(part.get_shape()), _DTYPES.get(part.get_dtype(), part.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{who}: {str(path)!r} is not a readable safetensors file "
                              f"({exc}); it may be truncated or corrupt.") from None


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""safetensors' dtype names -> torch's."""


def _exists(path: Path, who: str) -> None:
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise CheckpointError(f"{who}: {path.name} is missing from {str(path.parent)!r} "
                              f"(it holds: {', '.join(present) or 'nothing'}).")


def tensors_writer(tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> Writer:
    """A :data:`Writer` of ``tensors`` (contiguous CPU copies, stored dtypes) as safetensors."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(data, tmp, metadata=dict(metadata or {}))


def json_writer(data: Mapping[str, Any]) -> Writer:
    """A :data:`Writer` of ``data`` as indented JSON; encoded now, so that a value JSON
    cannot hold raises (``TypeError``) before anything is written."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def write_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (contiguous CPU copies, stored dtypes) to ``path`` atomically."""
    _atomic(path, tensors_writer(tensors, metadata))


def read_json(path: Path, who: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        CheckpointError: the file is missing, not valid JSON, or not an object.
    """
    _exists(path, who)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{who}: {str(path)!r} is not valid JSON ({exc}); it may be "
                              f"truncated or corrupt. Nothing was loaded.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{who}: {str(path)!r} holds a JSON {type(data).__name__}, not an "
                              f"object of settings.")
    return data


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    _atomic(path, json_writer(data))


def write_together(files: Mapping[Path, Writer], remove: tuple[Path, ...] = ()) -> None:
    """Write several files as one: each to a temporary file beside its target first; only
    when all are written do they replace their targets (then ``remove`` is deleted).

    A write that fails (disk full, a value that cannot be stored) deletes the temporary
    files and re-raises; every target is then as it was.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            _make_dir(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    for path in remove:
        path.unlink(missing_ok=True)


def _make_dir(path: Path) -> None:
    """Create ``path`` and its parents.

    Raises:
        CheckpointError: it cannot be created (a parent is a file, no permission).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint directory {str(path)!r}: "
                              f"{exc.strerror or exc}. Nothing was written.") from None


def _atomic(path: Path, write: Any) -> None:
    _make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

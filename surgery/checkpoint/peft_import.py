"""Load a PEFT LoRA or IA³ adapter directory onto a model, as fx-surgery adapters.

::

    adapted = surgery.import_peft(base, "out/peft-adapter/")             # the "default" adapter
    adapted = surgery.import_peft(base, "out/peft-adapter/b", adapter_name="b")

The adapter is rebuilt with fx-surgery's own passes (LoRA, IA³, and ``TrainModulePass`` for
``modules_to_save``) on the exact layers PEFT would adapt
(:mod:`surgery.checkpoint.peft_targets`), through :func:`surgery.apply_passes`: the result
is a weight-sharing copy of ``base`` of the user's own class, and ``base`` is never changed.
Then the file's tensors replace the new parameters. Everything is checked before anything
is built: the settings (:mod:`surgery.checkpoint.peft_config`), the keys, shapes and dtypes
of the tensors (:mod:`surgery.checkpoint.peft_keys`).
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from surgery.adapters.merge_state import adapter_inventory
from surgery.adapters.names import check_adapter_name
from surgery.apply import apply_passes, unwrap
from surgery.checkpoint.files import checkpoint_dir, read_json, read_tensors
from surgery.checkpoint.peft_config import CONFIG_NAME, PeftSettings, read_peft_config
from surgery.checkpoint.peft_keys import (
    PREFIX,
    WEIGHTS_NAME,
    PeftKey,
    check_keys,
    expected_keys,
)
from surgery.checkpoint.peft_params import import_param_adapter, is_param_config
from surgery.checkpoint.peft_targets import PeftTargets, resolve_peft_targets
from surgery.checkpoint.registry import known_pass
from surgery.errors import CheckpointError, ConfigError, SurgeryError
from surgery.pass_base import Pass

__all__ = ["import_peft"]

_WHO = "import_peft"


def import_peft(base_model: nn.Module, directory: str | os.PathLike[str],
                adapter_name: str = "default", *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the PEFT adapter in ``directory`` onto a weight-sharing copy of ``base_model``.

    Reads PEFT's files (``peft.PeftModel.save_pretrained`` writes them; a non-default
    adapter sits in a subdirectory named after it): ``adapter_config.json`` and
    ``adapter_model.safetensors``. The result computes what ``peft.PeftModel.from_pretrained(
    base_model, directory)`` computes (in float32, to within ``1e-6 · (1 + max|y|)``), with
    ``use_rslora``, ``use_dora`` (DoRA on ``nn.Linear`` / ``Conv1D`` / convolutions, the magnitude
    ``<layer>.lora_magnitude_vector`` going to ``lora_magnitude_vector.<name>.weight``),
    ``rank_pattern`` / ``alpha_pattern``, ``layers_to_transform`` /
    ``layers_pattern``, ``lora_dropout``, ``exclude_modules``, ``modules_to_save`` and
    ``target_modules`` as a list, a regex or ``"all-linear"`` followed as PEFT follows them;
    ``fan_in_fan_out`` needs nothing (``lora_A`` is ``(r, in)`` and ``lora_B`` ``(out, r)``
    whatever the layer stores). LoRA on ``nn.Embedding`` (``lora_embedding_A`` /
    ``lora_embedding_B``) and on ``nn.Conv1d/2d/3d``, and IA³ on ``nn.Conv2d/3d``
    (``ia3_l`` of shape ``(1, channels, 1, ...)``), load too.

    Args:
        base_model: the model the adapter was trained on (a ``torch.compile`` or DDP wrapper
            is taken off); it may carry fx-surgery adapters already. Never changed.
        directory: the adapter directory.
        adapter_name: the name the adapter gets (PEFT's files do not record one).
        dtype: cast every floating-point tensor of the file to this dtype. Without it,
            tensors keep the dtype they were saved in, which must then be the dtype of the
            layer (or saved module) they go into.

    Returns:
        The adapted model (same class as ``base_model``): LoRA ``lora_A`` / ``lora_B`` of
        shapes ``(rank, in)`` / ``(out, rank)`` (a convolution's and an embedding's as PEFT
        has them), IA³ vectors ``(width,)`` over the whole layer width
        (a fused ``c_attn`` learns all three slices, as in PEFT), the modules of
        ``modules_to_save`` trained fully under their own names; with PEFT's ``bias``
        ``"lora_only"`` / ``"all"``, the file's base biases loaded and trained as by
        ``LoRAPass(bias=...)``. The adapter's parameters (and the saved modules and biases)
        train; every other parameter is frozen, as after :func:`surgery.apply_passes`.

    Raises:
        CheckpointError: the directory or a file is missing, unreadable, truncated or a
            pickle (``adapter_model.bin``: never unpickled); a setting fx-surgery cannot
            reproduce (DoRA on an embedding, a bias on ``lora_B``, LoRA on
            ``nn.MultiheadAttention`` or on a
            convolution with a dilation or padding mode PEFT's ``lora_A`` ignores, trainable
            token indices, Megatron, another PEFT method, ...),
            named; keys missing or unexpected, shapes or dtypes that do not fit (the first
            few of each, their number, the nearest names present); ``adapter_name`` taken
            already. Nothing is loaded and ``base_model`` is unchanged.
        ConfigError: ``adapter_name`` breaks the rule of adapter names (empty, holding
            ``"."``; see :func:`~surgery.adapters.names.check_adapter_name`), or ``dtype`` not a
            ``torch.dtype``.
    """
    check_adapter_name(_WHO, adapter_name, field="adapter_name")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{_WHO}: dtype must be a torch.dtype (torch.float32), got {dtype!r}")
    path = checkpoint_dir(directory, _WHO, must_exist=True)
    if (path / CONFIG_NAME).is_file() and is_param_config(read_json(path / CONFIG_NAME, _WHO)):
        if adapter_name in adapter_inventory(unwrap(base_model)[0]):
            raise CheckpointError(
                f"{_WHO}: the model already carries an adapter named {adapter_name!r}; nothing "
                f"was loaded. Way out: import_peft(..., adapter_name='<another name>').")
        return import_param_adapter(base_model, path, adapter_name, dtype)  # target_parameters
    settings = read_peft_config(path, _WHO)
    weights = path / WEIGHTS_NAME
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{_WHO}: {str(path)!r} holds adapter_model.bin, a pickle, which fx-surgery never "
            f"loads (unpickling runs code from the file). Way out: save the adapter again "
            f"with PEFT's save_pretrained(..., safe_serialization=True).")
    tensors = read_tensors(weights, _WHO)
    bare = unwrap(base_model)[0]
    present = adapter_inventory(bare)
    if adapter_name in present:
        raise CheckpointError(
            f"{_WHO}: the model already carries an adapter named {adapter_name!r}; nothing was "
            f"loaded. Way out: import_peft(..., adapter_name='<another name>').")
    kind = "lora" if settings.peft_type == "LORA" else "ia3"
    targets = resolve_peft_targets(bare, settings, adapter_name, _WHO)
    _refuse_tied(bare, targets, settings)
    expected = expected_keys(bare, targets, kind)
    tensors = _without_unchanged_base(tensors, expected, bare)
    check_keys(tensors, expected, _WHO, str(weights), base_keys=bare.state_dict().keys())
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _check_dtypes(tensors, expected, dtype)
    try:
        steps = _passes(settings, targets, kind, adapter_name)
        with torch.random.fork_rng(devices=[]):  # initialisations the file then replaces
            adapted = apply_passes(base_model, steps)
    except SurgeryError as exc:
        raise CheckpointError(f"{_WHO}: the adapter of {settings.source} cannot be built on "
                              f"this model: {exc}") from exc
    _load(adapted, tensors, expected, adapter_name)
    return adapted


def _exact(names: list[str] | tuple[str, ...]) -> str:
    """One ``re:`` pattern selecting exactly ``names``."""
    return "re:" + "|".join(re.escape(n) for n in names)


def _passes(settings: PeftSettings, targets: PeftTargets, kind: str,
            adapter_name: str) -> list[Pass]:
    """The fx-surgery passes that build this adapter on exactly its layers."""
    names = [s.qname for s in targets.sites]
    if kind == "lora":
        rank = settings.r
        alpha = settings.lora_alpha
        step = known_pass("lora").from_config(dict(
            pattern=_exact(names), rank=rank, alpha=alpha,
            rank_for=[(_exact([s.qname]), s.rank) for s in targets.sites if s.rank != rank],
            alpha_for=[(_exact([s.qname]), s.alpha) for s in targets.sites if s.alpha != alpha],
            dropout=settings.lora_dropout, use_rslora=settings.use_rslora,
            use_dora=settings.use_dora, name=adapter_name, bias=settings.bias))
    else:
        feedforward = [s.qname for s in targets.sites if s.feedforward]
        step = known_pass("ia3").from_config(dict(
            pattern=_exact(names), feedforward=[_exact(feedforward)] if feedforward else [],
            fused="all", name=adapter_name))
    out = [step]
    if targets.modules_to_save:
        out.append(known_pass("train_module").from_config(
            dict(pattern=_exact(targets.modules_to_save))))
    return out


def _refuse_tied(model: nn.Module, targets: PeftTargets, settings: PeftSettings) -> None:
    """PEFT trains a copy of each module to save, untied from any module sharing its
    parameters; fx-surgery trains the module itself, ties included. Refuse where the two
    would differ: a saved module sharing a parameter with a module not saved."""
    saved = targets.modules_to_save
    if not saved:
        return
    inside = {id(p) for q in saved for p in model.get_submodule(q).parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        if id(param) in inside and not any(owner == q or owner.startswith(q + ".") for q in saved):
            raise CheckpointError(
                f"{_WHO}: {settings.source}: modules_to_save trains a module whose parameter is "
                f"tied to {name}; PEFT trains an untied copy of the module, fx-surgery the "
                f"module itself (so {name} would change too). Nothing was loaded. Way out: "
                f"untie the weights of the base model first, or list both modules in "
                f"modules_to_save.")


def _check_dtypes(tensors: dict[str, torch.Tensor], expected: dict[str, PeftKey],
                  cast: torch.dtype | None) -> None:
    wrong = [k for k, spec in expected.items() if tensors[k].dtype != spec.dtype]
    if not wrong:
        return
    first = wrong[0]
    shown = ", ".join(f"{k} ({tensors[k].dtype} into {expected[k].dtype})" for k in wrong[:5])
    more = f", ... ({len(wrong)} in all)" if len(wrong) > 5 else ""
    how = (f"cast to {cast}" if cast is not None else "saved")
    raise CheckpointError(
        f"{_WHO}: tensors {how} in another dtype than the layers they go into: {shown}{more}. "
        f"Nothing was loaded. Way out: import_peft(..., dtype={expected[first].dtype}), or "
        f"convert the base model to {tensors[first].dtype} first.")


def _without_unchanged_base(tensors: dict[str, torch.Tensor], expected: dict[str, PeftKey],
                            model: nn.Module) -> dict[str, torch.Tensor]:
    """``tensors`` without the base-model weights PEFT saved beside the adapter that equal
    the model's own, bit for bit: with ``save_embedding_layers="auto"`` (its default) PEFT
    stores a targeted embedding's whole weight (``<layer>.base_layer.weight``) in case the
    vocabulary was resized. A weight that differs stays, and is refused as unexpected."""
    own = model.state_dict()
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        if (key not in expected and key.startswith(PREFIX) and name in own
                and own[name].shape == value.shape and own[name].dtype == value.dtype
                and torch.equal(own[name], value)):
            continue
        out[key] = value
    return out


def _load(model: nn.Module, tensors: dict[str, torch.Tensor], expected: dict[str, PeftKey],
          adapter_name: str) -> None:
    """Put the file's tensors into the adapted model's new parameters (rebinding ``.data``:
    storage shared with ``base_model`` is never written)."""
    root = unwrap(model)[0]
    with torch.no_grad():
        for key, spec in expected.items():
            value = tensors[key]
            if spec.slot in ("lora_A", "lora_B", "lora_magnitude_vector"):
                param = root.get_submodule(spec.qname)._modules[spec.slot][adapter_name].weight
                param.data = value.to(param.device)
            elif spec.slot in ("lora_embedding_A", "lora_embedding_B", "ia3_l"):  # <slot>.<name>
                param = root.get_submodule(spec.qname).get_parameter(f"{spec.slot}.{adapter_name}")
                param.data = value.to(param.device)
            else:
                _assign(root.get_submodule(spec.qname), spec.local, value)


def _assign(module: nn.Module, local: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = local.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if owner._parameters.get(leaf) is not None:
        param = owner._parameters[leaf]
        param.data = value.to(param.device)
    else:
        buf = owner._buffers[leaf]
        owner._buffers[leaf] = value.to(buf.device)

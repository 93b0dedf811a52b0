"""PEFT files of LoRA adapters on parameters (PEFT's ``target_parameters``), both ways.

An adapter whose updates fold into named parameters of its sites (the heads of
:mod:`surgery.adapters.fold_params`: LoRA on fused expert weights,
``LoRAPass(target_parameters=[...])``) is written as PEFT writes a
``LoraConfig(target_parameters=[...])`` adapter: ``adapter_config.json`` with
``target_modules: []`` and ``target_parameters`` naming every adapted parameter by its
qualified name (PEFT matches a name exactly or by a dot-suffix), and
``adapter_model.safetensors`` with ``base_model.model.<site>.lora_A.weight`` ``(r·E, in)`` and
``.lora_B.weight`` ``(out, r·E)``, PEFT's nesting kept (``<site>.base_layer.lora_A.weight``
for the first of two weights). Reading such a directory builds the same adapter with
``LoRAPass(target_parameters=...)`` and loads the tensors.

What PEFT's files can say about these adapters and this module follows: one rank and one
scaling for the adapter (``rank_pattern`` / ``alpha_pattern`` refused), no dropout, DoRA,
bias or ``modules_to_save``, and no ``target_modules`` beside ``target_parameters``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters.fold_layout import adapter_modules
from surgery.adapters.fold_params import param_heads
from surgery.checkpoint.files import read_json, read_tensors
from surgery.checkpoint.peft_keys import PREFIX, WEIGHTS_NAME
from surgery.checkpoint.peft_settings import task_type
from surgery.checkpoint.registry import known_pass
from surgery.errors import CheckpointError
from surgery.sites.site_graph import site_graphs

__all__ = ["is_param_adapter", "param_adapter_plan", "is_param_config", "import_param_adapter"]


def _local(rel: str, name: str) -> str:
    """PEFT's key relative to the site: the adapter's name taken out after its slot
    (``base_layer.lora_A.default.weight`` → ``base_layer.lora_A.weight``)."""
    parts = rel.split(".")
    for i in range(1, len(parts)):
        if parts[i] == name and parts[i - 1] in ("lora_A", "lora_B"):
            del parts[i]
            break
    return ".".join(parts)


def _sites(model: nn.Module, name: str) -> list[tuple[str, Any, list[Any]]]:
    """``(site, site graph, heads)`` of LoRA adapter ``name`` folding into parameters."""
    out = []
    for qname, sg in site_graphs(model):
        heads = param_heads(sg, ("lora", name))
        if heads:
            out.append((qname, sg, heads))
    return out


def is_param_adapter(model: nn.Module, name: str) -> bool:
    """True when LoRA adapter ``name`` of ``model`` adapts parameters (and only those).

    Raises:
        CheckpointError: it adapts parameters at some sites and layers at others; PEFT's
            files of one adapter hold one or the other here.
    """
    params = _sites(model, name)
    if not params:
        return False
    others = [q for q, sg in site_graphs(model)
              if adapter_modules(sg, ("lora", name)) and not param_heads(sg, ("lora", name))]
    if others:
        raise CheckpointError(
            f"export_peft: LoRA adapter {name!r} adapts expert weights ({params[0][0]}) and "
            f"layers ({others[0]}); their PEFT files are written one kind per adapter here. "
            f"Nothing was written. Way out: add them under two adapter names.")
    return True


def param_adapter_plan(model: nn.Module, name: str, trained: list[str]
                       ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of LoRA adapter ``name`` on parameters.

    Raises:
        CheckpointError: ranks or scalings differ between the adapted weights, or modules
            are trained fully beside it.
    """
    if trained:
        raise CheckpointError(
            f"export_peft: LoRA adapter {name!r} on expert weights is written without "
            f"modules_to_save here, but {trained[0]} is trained fully. Nothing was written. "
            f"Way out: save_adapters, which keeps both.")
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    settings: set[tuple[int, float, float]] = set()
    for qname, sg, heads in _sites(model, name):
        for head in heads:
            targets.append(f"{qname}.{head.fold_param}")
            settings.add((int(head.rank), float(head.alpha), float(head.scaling)))
        for rel, mod in adapter_modules(sg, ("lora", name)):
            for pname, p in mod.named_parameters():
                tensors[f"{PREFIX}{qname}.{_local(f'{rel}.{pname}', name)}"] = p.detach().clone()
    if len(settings) != 1:
        raise CheckpointError(
            f"export_peft: LoRA adapter {name!r} has several ranks / scalings on its expert "
            f"weights ({sorted(settings)}); PEFT's files here give one r and lora_alpha. "
            f"Nothing was written. Way out: one rank and alpha for the adapter.")
    rank, alpha, scaling = settings.pop()
    rslora = rank > 1 and not math.isclose(scaling, alpha / rank)  # alpha / sqrt(r) then
    task = task_type(model)
    hf_config = getattr(model, "config", None)
    config: dict[str, Any] = {"peft_type": "LORA", "task_type": task}
    if task is None:  # as PEFT writes it: where to find the model's class
        config["auto_mapping"] = {"base_model_class": type(model).__name__,
                                  "parent_library": type(model).__module__}
    config["base_model_name_or_path"] = getattr(hf_config, "name_or_path", None) or None
    config.update({"revision": None, "inference_mode": True, "target_modules": [],
                   "target_parameters": targets, "exclude_modules": None,
                   "fan_in_fan_out": False, "modules_to_save": None, "r": rank,
                   "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": rslora,
                   "bias": "none", "init_lora_weights": True, "layers_to_transform": None,
                   "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                   "use_dora": False, "lora_bias": False})
    return config, tensors


def is_param_config(raw: dict[str, Any]) -> bool:
    """True for the settings of a PEFT adapter with ``target_parameters``."""
    return raw.get("peft_type") == "LORA" and bool(raw.get("target_parameters"))


_DEFAULTS = {"target_modules": (None, [], ""), "rank_pattern": (None, {}),
             "alpha_pattern": (None, {}), "lora_dropout": (0, 0.0, None),
             "use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
             "layers_to_transform": (None,), "lora_bias": (False, None),
             "trainable_token_indices": (None,), "layer_replication": (None,),
             "megatron_config": (None,), "exclude_modules": (None, [], "")}
"""Settings a ``target_parameters`` adapter must leave at these values to be read here."""


def _steps(raw: dict[str, Any], adapter_name: str, source: str) -> list[Any]:
    """The passes that build the adapter ``raw`` describes (one ``LoRAPass``).

    Raises:
        CheckpointError: a setting listed in :data:`_DEFAULTS` is set, or ``r`` /
            ``lora_alpha`` are not positive numbers.
    """
    for key, allowed in _DEFAULTS.items():
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(
                f"import_peft: {source}: target_parameters with {key}={raw[key]!r} is not read "
                f"here (LoRA on expert weights takes one rank and alpha, no dropout, DoRA, bias, "
                f"modules_to_save or target_modules beside it). Nothing was loaded.")
    rank, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"import_peft: {source}: r={rank!r} / lora_alpha={alpha!r} are not "
                              f"a positive int and a positive number. Nothing was loaded.")
    targets = list(raw["target_parameters"])  # PEFT: a whole name or a dot-suffix
    patterns = [f"re:(?:.*\\.)?{re.escape(t)}" for t in targets]
    return [known_pass("lora").from_config(dict(
        target_parameters=patterns, rank=rank, alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)), name=adapter_name))]


def _tensor_keys(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """PEFT's key → the parameter of LoRA adapter ``name`` it loads into."""
    out = {}
    for qname, sg, _ in _sites(model, name):
        for rel, mod in adapter_modules(sg, ("lora", name)):
            for pname, p in mod.named_parameters():
                out[f"{PREFIX}{qname}.{_local(f'{rel}.{pname}', name)}"] = p
    return out


def _load(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
          source: Path | str, dtype: torch.dtype | None) -> None:
    """Check ``tensors`` against the adapter's parameters (keys, shapes, dtypes) and put them
    in (rebinding ``.data``).

    Raises:
        CheckpointError: keys missing or unexpected, or shapes or dtypes that do not fit.
    """
    params = _tensor_keys(model, name)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(f"import_peft: {source}: keys missing {missing[:5]}, unexpected "
                              f"{extra[:5]}. Nothing was loaded.")
    for key, p in params.items():
        value = tensors[key].to(dtype) if dtype is not None else tensors[key]
        if tuple(value.shape) != tuple(p.shape) or value.dtype != p.dtype:
            raise CheckpointError(
                f"import_peft: {source}: {key} is {tuple(value.shape)} {value.dtype}, the model "
                f"needs {tuple(p.shape)} {p.dtype}. Nothing was loaded. Way out: the base "
                f"model the adapter was trained on (or dtype=...).")
    with torch.no_grad():
        for key, p in params.items():
            value = tensors[key].to(dtype) if dtype is not None else tensors[key]
            p.data = value.to(p.device)


def import_param_adapter(base_model: nn.Module, directory: Path, adapter_name: str,
                         dtype: torch.dtype | None) -> nn.Module:
    """:func:`surgery.import_peft` for a directory whose settings have ``target_parameters``
    (:func:`is_param_config`): ``LoRAPass(target_parameters=...)`` on a weight-sharing copy
    of ``base_model``, then the file's tensors.

    Raises:
        CheckpointError: see :func:`_steps` and :func:`_load`; a pass error, named.
    """
    from surgery.apply import apply_passes, unwrap
    from surgery.errors import SurgeryError

    source = directory / "adapter_config.json"
    raw = read_json(source, "import_peft")
    steps = _steps(raw, adapter_name, str(source))
    tensors = read_tensors(directory / WEIGHTS_NAME, "import_peft")
    try:
        with torch.random.fork_rng(devices=[]):  # initialisations the file then replaces
            adapted = apply_passes(base_model, steps)
    except SurgeryError as exc:
        raise CheckpointError(f"import_peft: the adapter of {source} cannot be built on this "
                              f"model: {exc}") from exc
    _load(unwrap(adapted)[0], adapter_name, tensors, directory / WEIGHTS_NAME, dtype)
    return adapted

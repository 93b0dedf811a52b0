"""PEFT's ``adapter_config.json``: read it, check it, and say what it asks for.

A PEFT adapter directory holds ``adapter_config.json`` (the settings) and
``adapter_model.safetensors`` (the tensors). This module reads the settings of a LoRA or
IA³ adapter into a :class:`PeftSettings` and refuses, naming the setting, everything a PEFT
file can say that fx-surgery does not compute (a bias on ``lora_B``, LoRA on parameters,
trainable token indices, Megatron layers, an initialisation that rewrites the base weights,
other PEFT methods, ...), so an adapter is either reproduced or not loaded at all.

Settings that change what the adapter computes and that fx-surgery follows:

* LoRA: ``r``, ``lora_alpha``, ``use_rslora`` (``alpha / sqrt(r)``), ``use_dora`` (DoRA,
  on ``nn.Linear`` / ``Conv1D`` layers: other layers are refused when the file is matched
  to a model), ``rank_pattern`` and
  ``alpha_pattern`` (regex keys, matched at a dot boundary against the end of a module's
  qualified name, first key wins), ``lora_dropout``, ``bias`` (``"lora_only"`` / ``"all"``:
  base biases trained beside the adapter, ``LoRAPass(bias=...)``; their tensors are in the
  file).
* IA³: ``feedforward_modules`` (these layers scale their input, the others their output).
* Both: ``target_modules`` (a regex string matched against the whole qualified name, the
  string ``"all-linear"``, or a list of names each matching a whole name or a dot-suffix),
  ``exclude_modules`` (the same forms), ``layers_to_transform`` with ``layers_pattern``
  (layer indices, for a list ``target_modules`` only), ``modules_to_save`` (modules trained
  fully, matched by the end of their name), ``task_type``.

Settings read but without effect on the outputs: ``fan_in_fan_out`` (PEFT itself sets it
from the layer type; it orients merges only, ``lora_A`` is ``(r, in)`` and ``lora_B`` is
``(out, r)`` on ``Conv1D`` layers too), ``inference_mode``, ``base_model_name_or_path``,
``revision``, ``peft_version``, ``auto_mapping``, ``init_lora_weights`` (for the
initialisations that leave the base weights alone) and ``init_ia3_weights``. How
:mod:`surgery.checkpoint.peft_targets` turns the targeting settings into exact module names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.checkpoint.files import read_json
from surgery.errors import CheckpointError, near_matches

__all__ = ["CONFIG_NAME", "PeftSettings", "read_peft_config", "parse_peft_config"]

CONFIG_NAME = "adapter_config.json"
"""The settings file of a PEFT adapter directory."""

PEFT_TYPES = ("LORA", "IA3")
"""The PEFT methods fx-surgery reads and writes."""

_COMMON = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
           "revision", "inference_mode", "target_modules", "exclude_modules", "modules_to_save",
           "fan_in_fan_out"}
_LORA_USED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "layers_to_transform",
              "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights", "bias"}
_LORA_INERT = {"megatron_core", "qalora_group_size", "loftq_config", "eva_config",
               "corda_config", "lora_ga_config", "runtime_config"}
"""LoRA settings that only matter together with a setting refused below, or only at
initialisation (the saved tensors replace what they initialise)."""
_IA3_USED = {"feedforward_modules", "init_ia3_weights"}

_LORA_REFUSED: dict[str, tuple[Any, str]] = {
    "lora_bias": (False, "a bias on lora_B (lora_bias)"),
    "megatron_config": (None, "Megatron parallel layers (megatron_config)"),
    "trainable_token_indices": (None, "trainable token indices (trainable_token_indices)"),
    "target_parameters": (None, "LoRA on parameters rather than modules (target_parameters)"),
    "layer_replication": (None, "layer replication (layer_replication)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "use_qalora": (False, "QA-LoRA (use_qalora)"),
    "velora_config": (None, "VeLoRA (velora_config)"),
    "monteclora_config": (None, "MonteCLoRA (monteclora_config)"),
    "use_bdlora": (None, "block-diagonal LoRA (use_bdlora)"),
    "arrow_config": (None, "Arrow routing (arrow_config)"),
    "kasa_config": (None, "KaSA (kasa_config)"),
    "ensure_weight_tying": (False, "adapters tied between embedding and output layers "
                                   "(ensure_weight_tying)"),
}
"""LoRA settings that change what the adapter computes in ways fx-surgery does not: each
must hold its default (or be empty), else the file is refused naming the feature."""

_INIT_KEEPS_BASE = (True, False, "gaussian", "eva", "orthogonal")
"""``init_lora_weights`` values that initialise only the LoRA factors (which the file's
tensors then replace); the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) rewrite the base
weights, or select a LoRA variant (MiCA)."""


@dataclass(frozen=True)
class PeftSettings:
    """What a PEFT ``adapter_config.json`` asks for, checked.

    Attributes:
        peft_type: ``"LORA"`` or ``"IA3"``.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or ``None``.
        target_modules: a regex string (matched with ``re.fullmatch`` against qualified
            module names), ``"all-linear"``, or a tuple of names (each matching a whole
            name or a dot-suffix).
        exclude_modules: ``None``, a regex string, or a tuple of names (same rules).
        modules_to_save: names of modules trained fully, as written (PEFT adds
            ``classifier`` / ``score`` for ``SEQ_CLS`` and ``TOKEN_CLS`` and ``qa_outputs``
            for ``QUESTION_ANS``: see :attr:`effective_modules_to_save`).
        layers_to_transform: ``None``, one layer index or a tuple of them.
        layers_pattern: ``None`` or a tuple of names of the layer list (``"layers"``, ``"h"``).
        r / lora_alpha / lora_dropout / use_rslora / use_dora / rank_pattern / alpha_pattern: LoRA's
            settings (``rank_pattern`` and ``alpha_pattern`` in file order).
        bias: LoRA's ``bias``: ``"none"``, ``"lora_only"`` (the biases of the adapted layers
            train, and the file holds them) or ``"all"`` (every bias of the model).
        feedforward_modules: IA³'s input-scaled layers: a regex string or a tuple of name
            endings (PEFT's plain ``str.endswith``, no dot boundary).
        source: the file the settings came from, for messages.
    """

    peft_type: str
    task_type: str | None
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    modules_to_save: tuple[str, ...]
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    feedforward_modules: str | tuple[str, ...] = ()
    source: str = CONFIG_NAME

    @property
    def effective_modules_to_save(self) -> tuple[str, ...]:
        """``modules_to_save`` with the heads PEFT adds for the task type."""
        extra: tuple[str, ...] = ()
        if self.task_type in ("SEQ_CLS", "TOKEN_CLS"):
            extra = ("classifier", "score")
        elif self.task_type == "QUESTION_ANS":
            extra = ("qa_outputs",)
        return tuple(dict.fromkeys(self.modules_to_save + extra))


def read_peft_config(directory: Path, who: str) -> PeftSettings:
    """The checked settings of the PEFT adapter directory ``directory``.

    Raises:
        CheckpointError: the file is missing or not JSON, or holds settings that are invalid
            or that fx-surgery cannot reproduce (see :func:`parse_peft_config`).
    """
    path = directory / CONFIG_NAME
    if not path.is_file() and directory.is_dir():
        nested = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        if nested:
            raise CheckpointError(
                f"{who}: {str(directory)!r} has no {CONFIG_NAME} of its own, but its "
                f"subdirectories {nested} do (PEFT saves adapters other than 'default' there). "
                f"Way out: pass {str(directory / nested[0])!r}.")
        if (directory / "surgery_config.json").is_file():
            raise CheckpointError(f"{who}: {str(directory)!r} is an fx-surgery checkpoint, not a "
                                  f"PEFT adapter. Way out: surgery.load_adapters(base_model, "
                                  f"{str(directory)!r}).")
    return parse_peft_config(read_json(path, who), who, source=str(path))


def parse_peft_config(data: Mapping[str, Any], who: str, *, source: str = CONFIG_NAME
                      ) -> PeftSettings:
    """Check the settings of a PEFT ``adapter_config.json`` and return them.

    Args:
        data: the file's JSON object.
        who: the calling function, for messages.
        source: the file's path, for messages.

    Raises:
        CheckpointError: ``peft_type`` is not ``"LORA"`` or ``"IA3"``; a setting has a wrong
            type or value (``r`` not a positive int, a regex that does not compile, ...); a
            setting asks for something fx-surgery does not compute (named in the message);
            ``target_modules`` or IA³'s ``feedforward_modules`` is null (PEFT then fills them
            from its own table of model types, which fx-surgery does not keep); a setting
            this version does not know has a non-empty value.
    """
    where = f"{who}: {source}"
    kind = data.get("peft_type")
    if kind not in PEFT_TYPES:
        raise CheckpointError(
            f"{where} is a {kind!r} adapter (peft_type); fx-surgery reads PEFT's LoRA and IA³ "
            f"adapters ({', '.join(map(repr, PEFT_TYPES))}). Nothing was loaded.")
    known = _COMMON | (_LORA_USED | _LORA_INERT | set(_LORA_REFUSED)
                       if kind == "LORA" else _IA3_USED)
    for key, value in data.items():
        if key not in known and not _empty(value):
            raise CheckpointError(
                f"{where} sets {key}={value!r}, a setting fx-surgery does not know, so it cannot "
                f"tell whether it changes what the adapter computes. Nothing was loaded. Way "
                f"out: remove it from the file if you know it does not.")
    if kind == "LORA":
        _refuse_lora_features(data, where)
    target = _selector(data.get("target_modules"), "target_modules", where)
    if target is None:
        raise CheckpointError(
            f"{where} has target_modules=null: PEFT then picks modules from its own table of "
            f"model types, which fx-surgery does not keep. Nothing was loaded. Way out: write "
            f"the module names into target_modules (the keys of adapter_model.safetensors "
            f"name them).")
    common = dict(
        peft_type=kind,
        task_type=_optional_str(data.get("task_type"), "task_type", where),
        target_modules=target,
        exclude_modules=_selector(data.get("exclude_modules"), "exclude_modules", where),
        modules_to_save=_names(data.get("modules_to_save"), "modules_to_save", where),
        source=source,
    )
    if kind == "IA3":
        return PeftSettings(**common, feedforward_modules=_feedforward(data, target, where))
    layers, pattern = _layers(data, target, where)
    return PeftSettings(
        **common,
        layers_to_transform=layers,
        layers_pattern=pattern,
        r=_positive_int(data.get("r", 8), "r", where),
        lora_alpha=_number(data.get("lora_alpha", 8), "lora_alpha", where),
        lora_dropout=_dropout(data.get("lora_dropout", 0.0), where),
        use_rslora=_bool(data.get("use_rslora", False), "use_rslora", where),
        use_dora=_bool(data.get("use_dora", False), "use_dora", where),
        rank_pattern=_pattern_map(data.get("rank_pattern"), "rank_pattern", where, _positive_int),
        alpha_pattern=_pattern_map(data.get("alpha_pattern"), "alpha_pattern", where, _number),
        bias=data.get("bias") or "none",
    )


# --------------------------------------------------------------------------- refusals


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _refuse_lora_features(data: Mapping[str, Any], where: str) -> None:
    for key, (default, feature) in _LORA_REFUSED.items():
        value = data.get(key, default)
        if value != default and not _empty(value):
            raise CheckpointError(
                f"{where} uses {feature}: {key}={value!r}. fx-surgery's LoRA computes "
                f"W x + (alpha / r) · B A x only, so it cannot reproduce this adapter; nothing "
                f"was loaded. Way out: merge the adapter into the weights with PEFT "
                f"(merge_and_unload) and use that model, or train a plain LoRA adapter.")
    bias = data.get("bias") or "none"
    modes = ("none", "lora_only", "all")
    if bias not in modes:
        near = ", ".join(map(repr, near_matches(str(bias), modes)))
        raise CheckpointError(
            f"{where} sets bias={bias!r}; PEFT's LoRA knows 'none', 'lora_only' and 'all' "
            f"(nearest: {near}). Nothing was loaded. Way out: one of those values.")
    init = data.get("init_lora_weights", True)
    if init not in _INIT_KEEPS_BASE:
        raise CheckpointError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base "
            f"weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or selects a LoRA variant (MiCA); "
            f"its tensors apply to a base model fx-surgery does not have. Nothing was loaded. "
            f"Way out: convert it with PEFT's save_pretrained("
            f"path_initial_model_for_weight_conversion=...) into a plain LoRA adapter.")


# --------------------------------------------------------------------------- values


def _selector(value: Any, key: str, where: str) -> str | tuple[str, ...] | None:
    """``None``, a regex string (checked to compile), or a tuple of names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear" and key == "target_modules":
            return "all-linear"
        _compile(value, key, where)
        return value
    return _names(value, key, where)


def _names(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{where}: {key} must be a list of module names, got {value!r}.")
    return tuple(dict.fromkeys(value))


def _compile(pattern: str, key: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(f"{where}: {key}={pattern!r} is not a valid regular expression "
                              f"({exc}).") from None


def _optional_str(value: Any, key: str, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{where}: {key} must be a string or null, got {value!r}.")
    return value


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}.")
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {key} must be a finite number, got {value!r}.")
    return float(value)


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}.")
    return value


def _dropout(value: Any, where: str) -> float:
    p = _number(value, "lora_dropout", where)
    if not 0.0 <= p < 1.0:
        raise CheckpointError(f"{where}: lora_dropout must be in [0, 1), got {value!r}.")
    return p


def _pattern_map(value: Any, key: str, where: str, check: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {key} must map module-name regexes to values, got "
                              f"{value!r}.")
    out = {}
    for pat, val in value.items():
        _compile(pat, f"{key} key", where)
        out[pat] = check(val, f"{key}[{pat!r}]", where)
    return out


def _layers(data: Mapping[str, Any], target: str | tuple[str, ...], where: str
            ) -> tuple[int | tuple[int, ...] | None, tuple[str, ...] | None]:
    """``layers_to_transform`` and ``layers_pattern``, with PEFT's own consistency rules."""
    layers = data.get("layers_to_transform")
    pattern = data.get("layers_pattern")
    if isinstance(target, str) and (layers is not None or pattern is not None):
        raise CheckpointError(
            f"{where}: layers_to_transform / layers_pattern apply to a list of target_modules, "
            f"not to the regex {target!r} (PEFT refuses this too).")
    if pattern and layers is None:
        raise CheckpointError(f"{where}: layers_pattern={pattern!r} needs layers_to_transform "
                              f"(PEFT refuses this too).")
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            pass
        elif isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in layers):
            layers = tuple(layers)
        else:
            raise CheckpointError(f"{where}: layers_to_transform must be a layer index or a "
                                  f"list of them, got {layers!r}.")
    if pattern is not None:
        if isinstance(pattern, str):
            pattern = (pattern,) if pattern else ()
        elif isinstance(pattern, list) and all(isinstance(p, str) for p in pattern):
            pattern = tuple(pattern)
        else:
            raise CheckpointError(f"{where}: layers_pattern must be a name or a list of names, "
                                  f"got {pattern!r}.")
        for p in pattern:
            _compile(p, "layers_pattern", where)
    return layers, pattern


def _feedforward(data: Mapping[str, Any], target: str | tuple[str, ...], where: str
                 ) -> str | tuple[str, ...]:
    value = data.get("feedforward_modules")
    if value is None:
        raise CheckpointError(
            f"{where} has feedforward_modules=null: PEFT then picks the feed-forward layers "
            f"from its own table of model types, which fx-surgery does not keep. Nothing was "
            f"loaded. Way out: write them into feedforward_modules ([] for none).")
    if isinstance(value, str):
        _compile(value, "feedforward_modules", where)
        return value
    names = _names(value, "feedforward_modules", where)
    if not isinstance(target, str) and not set(names) <= set(target):
        raise CheckpointError(
            f"{where}: feedforward_modules {sorted(set(names) - set(target))} are not in "
            f"target_modules (PEFT refuses this too).")
    return names

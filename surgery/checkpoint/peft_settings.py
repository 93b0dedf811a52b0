"""The settings of a PEFT ``adapter_config.json`` for an exported adapter, from its layers.

:func:`surgery.export_peft` collects one :class:`ExportLayer` per adapted layer; the
settings name those layers exactly (a regex of their qualified names), give the most
common rank and alpha with ``rank_pattern`` / ``alpha_pattern`` for the others, and say
``use_rslora`` where every scaling is ``alpha / sqrt(rank)``. :func:`adapter_settings`
builds them; the export reads them back with PEFT's own matching rules before anything is
written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ExportLayer", "adapter_settings", "exact_regex", "task_type"]

_TASKS = (
    (("ForCausalLM", "LMHeadModel"), "CAUSAL_LM"),
    (("ForSequenceClassification",), "SEQ_CLS"),
    (("ForTokenClassification",), "TOKEN_CLS"),
    (("ForQuestionAnswering",), "QUESTION_ANS"),
)
"""Class-name endings of transformers models whose PEFT ``task_type`` is evident."""


@dataclass
class ExportLayer:
    """One adapted layer of the adapter being exported."""

    qname: str
    conv1d: bool
    tensors: dict[str, torch.Tensor]  # PEFT's name relative to the layer -> tensor
    rank: int = 0
    alpha: float | None = None
    scaling: float = 0.0
    dropout: float | None = None  # None: the layer has none (an embedding; PEFT ignores it)
    feedforward: bool = False
    dora: bool = False  # a DoRA branch (its magnitude vector among the tensors)


def exact_regex(names: list[str]) -> str:
    """A regex matching exactly ``names`` (PEFT matches ``target_modules`` strings whole)."""
    return "|".join(re.escape(n) for n in names)


def adapter_settings(model: nn.Module, kind: str, layers: list[ExportLayer],
                     trained: list[str], task_type: str | None) -> dict[str, Any]:
    """PEFT's settings for ``layers`` of one adapter of ``kind`` (``"lora"`` or ``"ia3"``),
    with the modules trained fully (``modules_to_save``) and ``task_type``."""
    config: dict[str, Any] = {"peft_type": "LORA" if kind == "lora" else "IA3",
                              "task_type": task_type}
    if task_type is None:  # as PEFT writes it: where to find the model's class
        config["auto_mapping"] = {"base_model_class": type(model).__name__,
                                  "parent_library": type(model).__module__}
    hf_config = getattr(model, "config", None)
    config["base_model_name_or_path"] = (getattr(hf_config, "name_or_path", None)
                                         or model.__dict__.get("name_or_path") or None)
    config["revision"] = None
    config["inference_mode"] = True
    config["target_modules"] = exact_regex([layer.qname for layer in layers])
    config["exclude_modules"] = None
    config["fan_in_fan_out"] = any(layer.conv1d for layer in layers)
    config["modules_to_save"] = list(trained) or None
    if kind == "ia3":
        ff = [layer.qname for layer in layers if layer.feedforward]
        config["feedforward_modules"] = exact_regex(ff) if ff else []
        config["init_ia3_weights"] = True
        return config
    use_rslora, alphas = _alphas(layers)
    rank = _most_common([layer.rank for layer in layers])
    alpha = _most_common(alphas)
    config.update({
        "r": rank,
        "lora_alpha": _number(alpha),
        "lora_dropout": next((layer.dropout for layer in layers if layer.dropout is not None),
                             0.0),
        "use_rslora": use_rslora,
        "bias": "none",
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {f"^{re.escape(layer.qname)}": layer.rank for layer in layers
                         if layer.rank != rank},
        "alpha_pattern": {f"^{re.escape(layer.qname)}": _number(a) for layer, a
                          in zip(layers, alphas) if a != alpha},
        "use_dora": all(layer.dora for layer in layers),
        "lora_bias": False,
    })
    return config


def _alphas(layers: list[ExportLayer]) -> tuple[bool, list[float]]:
    """``use_rslora`` and each layer's alpha: the layers' own alphas when every scaling is
    ``alpha / rank`` (or every one ``alpha / sqrt(rank)``), else ``scaling · rank``."""
    def fits(how: Any) -> bool:
        return all(layer.alpha is not None and
                   math.isclose(layer.scaling, how(layer.alpha, layer.rank), rel_tol=1e-12)
                   for layer in layers)

    if fits(lambda a, r: a / r):
        return False, [layer.alpha for layer in layers]
    if fits(lambda a, r: a / math.sqrt(r)):
        return True, [layer.alpha for layer in layers]
    return False, [layer.scaling * layer.rank for layer in layers]


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> int | float:
    """``16`` rather than ``16.0`` where the value is whole (as PEFT's files write alphas)."""
    return int(value) if float(value).is_integer() else float(value)


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` of a transformers model whose class name makes it evident."""
    if not hasattr(getattr(model, "config", None), "model_type"):
        return None
    cls = type(model).__name__
    return next((task for endings, task in _TASKS if cls.endswith(endings)), None)

"""The bias modes of LoRA (PEFT's ``LoraConfig(bias=...)``): which base biases train beside
the low-rank factors.

* ``"none"``: no bias trains (the default).
* ``"lora_only"``: the bias of every layer the pass adapts (a layer without one is skipped).
* ``"all"``: every parameter of the model named ``bias`` (its last name segment), adapted or
  not: linear layers, layer norms, convolutions; adapter parameters are left alone.

A bias stays the base layer's own parameter under its own name (``q_proj.bias``); it is
recorded in ``model._surgery.trained_parameters`` (qualified name -> ``"lora"``), so
:func:`surgery.apply_passes` does not freeze it then or later and gives it its own storage
(training never writes into the model that was adapted), the audit shows it, and a
checkpoint saves it. A merge does not fold it (it is the base's own term already); unload
keeps its trained value.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from surgery.pass_base import Change
from surgery.sites.marker import AdapterModule

__all__ = ["BIAS_MODES", "check_bias", "train_biases"]

BIAS_MODES: tuple[str, ...] = ("none", "lora_only", "all")
"""The values of ``LoRAPass(bias=...)``, as PEFT's ``LoraConfig.bias``."""


def check_bias(value: object) -> str:
    """Why ``value`` is not a bias mode (``""`` when it is one)."""
    if isinstance(value, str) and value in BIAS_MODES:
        return ""
    return (f"bias must be one of {', '.join(map(repr, BIAS_MODES))} (PEFT's LoraConfig.bias), "
            f"got {value!r}. Way out: bias='lora_only' trains the biases of the adapted layers, "
            f"bias='all' every bias of the model")


def _adapter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, AdapterModule)
            for p in m.parameters()}


def train_biases(model: nn.Module, mode: str, sites: Sequence[str], pass_name: str
                 ) -> list[Change]:
    """Make the biases ``mode`` selects trainable, record them on ``model._surgery`` and
    return one ``"param_unfrozen"`` change each.

    Args:
        model: the model after the pass adapted its sites (the site graphs in place).
        mode: ``"none"``, ``"lora_only"`` or ``"all"`` (:data:`BIAS_MODES`).
        sites: qualified names of the layers the pass adapted (``""`` for the model itself).
        pass_name: the stable name of the pass (``"lora"``), recorded with each bias.

    Returns:
        The changes, in model order for ``"all"``, in site order for ``"lora_only"``; a
        bias reachable under two names (a shared module) is recorded once, first name.
    """
    if mode == "none":
        return []
    adapters = _adapter_ids(model)
    if mode == "all":
        chosen = [(n, p) for n, p in model.named_parameters()
                  if (n == "bias" or n.endswith(".bias")) and id(p) not in adapters]
    else:
        chosen = []
        seen: set[int] = set()
        for qname in sites:
            pname = f"{qname}.bias" if qname else "bias"
            owner = model.get_submodule(qname)
            param = owner._parameters.get("bias")
            if param is None or id(param) in seen or id(param) in adapters:
                continue
            seen.add(id(param))
            chosen.append((pname, param))
    changes = []
    for pname, param in chosen:
        param.requires_grad_(True)
        owner = pname.rpartition(".")[0]
        changes.append(Change("param_unfrozen", pass_name, owner, pname,
                              shape=tuple(param.shape), numel=param.numel(), trainable=True,
                              detail=f"bias trained (bias={mode!r})"))
    state = getattr(model, "_surgery", None)
    if state is not None and chosen:
        # a new dict, never an edit of the old one: a dry run's shallow copy of the state
        # must not reach the model it was copied from
        state.trained_parameters = {**state.trained_parameters,
                                    **{pname: pass_name for pname, _ in chosen}}
    return changes

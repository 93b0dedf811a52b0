"""Which tensors of an adapted model a checkpoint holds, found by structure.

The tensors of an adapter are the state of the inserted modules
(:class:`~surgery.sites.marker.AdapterModule`, found by type, never by a substring of a
name), under the keys of the model's own ``state_dict`` (``q_proj.lora_A.default.weight``),
plus the whole state of base modules trained fully (``TrainModulePass``, recorded on the
model's state) and the single base parameters a pass trains (the biases of
``LoRAPass(bias=...)``, recorded likewise). A tensor reachable under two keys of the
model's ``state_dict`` (tied weights: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``; a module shared under two names) is stored once, under its
first key, and the other keys are recorded as ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from surgery.sites.marker import AdapterModule, slot_parameters

__all__ = ["CheckpointTensor", "adapter_state", "trained_modules", "trained_parameters",
           "assign"]


@dataclass
class CheckpointTensor:
    """One tensor of a checkpoint.

    Attributes:
        tensor: the parameter or buffer itself (not a copy).
        adapter: the adapter name it belongs to; ``None`` for a base module trained fully
            or a base parameter trained alone.
        trainable: ``requires_grad`` (``False`` for buffers).
        ties: other keys under which the same tensor is reachable.
    """

    tensor: Tensor
    adapter: str | None
    trainable: bool
    ties: list[str] = field(default_factory=list)


def trained_modules(model: nn.Module) -> list[str]:
    """Qualified names of the base modules trained fully (``TrainModulePass``), in order."""
    state = getattr(model, "_surgery", None)
    return list(getattr(state, "trained_modules", None) or ())


def trained_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the single base parameters a pass trains (the biases of
    ``LoRAPass(bias=...)``), in the order they were recorded."""
    state = getattr(model, "_surgery", None)
    return list(getattr(state, "trained_parameters", None) or ())


def adapter_state(model: nn.Module) -> dict[str, CheckpointTensor]:
    """Every tensor a checkpoint of ``model`` holds, by ``state_dict`` key, in model order.

    The outermost adapter modules give their whole ``state_dict`` (parameters and
    persistent buffers, nested modules included), each parameter of an adapter's parameter
    slot (``<site>.ia3_l.<adapter>``) gives itself; each base module trained fully gives its
    own, and each base parameter trained alone gives itself. Every other key of
    ``model.state_dict()`` under which one of these tensors is reachable is recorded as a
    tie of its first key.
    """
    out: dict[str, CheckpointTensor] = {}
    by_id: dict[int, str] = {}

    def add(prefix: str, module: nn.Module, adapter: str | None) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            full = f"{prefix}.{key}" if prefix else key
            first = by_id.get(id(tensor))
            if first is not None:
                out[first].ties.append(full)
                continue
            by_id[id(tensor)] = full
            out[full] = CheckpointTensor(tensor, adapter, bool(tensor.requires_grad))

    outer: list[str] = []
    for qname, mod in model.named_modules():
        if not isinstance(mod, AdapterModule):
            continue
        if any(qname.startswith(o + ".") for o in outer):
            continue
        outer.append(qname)
        add(qname, mod, mod.adapter_name)
    for pname, param, _, adapter_name in slot_parameters(model):  # <site>.ia3_l.<adapter>
        if id(param) not in by_id:
            by_id[id(param)] = pname
            out[pname] = CheckpointTensor(param, adapter_name, bool(param.requires_grad))
    for qname in trained_modules(model):
        add(qname, model.get_submodule(qname), None)
    for pname in trained_parameters(model):
        param = model.get_parameter(pname)
        if id(param) not in by_id:
            by_id[id(param)] = pname
            out[pname] = CheckpointTensor(param, None, bool(param.requires_grad))
    for key, tensor in model.state_dict(keep_vars=True).items():
        first = by_id.get(id(tensor))
        if first is not None and key != first and key not in out[first].ties:
            out[first].ties.append(key)
    return out


def assign(model: nn.Module, key: str, value: Tensor) -> None:
    """Make the tensor at ``key`` of ``model`` hold ``value``, itself (not a copy, so in
    ``value``'s dtype and on its device).

    A parameter keeps its identity and ``requires_grad`` (its ``.data`` is rebound, so
    the storage it shared with another model is never written, and a parameter tied under
    several keys stays tied); a buffer is replaced under ``key`` only.
    """
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters and owner._parameters[leaf] is not None:
        owner._parameters[leaf].data = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:  # pragma: no cover - keys come from adapter_state of the same model
        raise KeyError(key)

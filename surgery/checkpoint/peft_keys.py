"""The keys of PEFT's ``adapter_model.safetensors``, and checking a file against a model.

PEFT stores an adapter's tensors under the model's own qualified names, prefixed with
``base_model.model.`` and without the adapter's name:

==========================================================  =================================
key                                                         tensor
==========================================================  =================================
``base_model.model.<layer>.lora_A.weight``                  LoRA ``A``, ``(r, in)``; on a
                                                            convolution ``(r, in, *kernel)``
``base_model.model.<layer>.lora_B.weight``                  LoRA ``B``, ``(out, r)``; on a
                                                            convolution ``(out, r / groups,
                                                            1, ...)``
``base_model.model.<layer>.lora_magnitude_vector``          DoRA's magnitude ``m``,
                                                            ``(out,)``, on a convolution
                                                            ``(1, out, 1, ...)`` (``use_dora``; no
                                                            ``.weight``: PEFT drops it)
``base_model.model.<layer>.lora_embedding_A``               LoRA ``A`` of an embedding,
                                                            ``(r, num_embeddings)``
``base_model.model.<layer>.lora_embedding_B``               LoRA ``B`` of an embedding,
                                                            ``(embedding_dim, r)``
``base_model.model.<layer>.ia3_l``                          IA³ ``l``: ``(out, 1)``, or
                                                            ``(1, in)`` for a feed-forward
                                                            layer (input scaling); on a
                                                            convolution ``(1, out, 1, ...)``
                                                            or ``(1, in, 1, ...)``
``base_model.model.<module>.<key in its state_dict>``       a module of ``modules_to_save``
==========================================================  =================================

``Conv1D`` layers (GPT-2) use the same orientation: ``A`` is ``(r, in)``, ``B`` is
``(out, r)``. The keys are the adapted model's parameter names with ``base_model.model.``
in front and the adapter's name taken out (``wte.lora_embedding_A.default`` is saved as
``base_model.model.wte.lora_embedding_A``; :func:`peft_local`). Keys are built from exact
module names and matched whole (:func:`expected_keys`, :func:`check_keys`), never by
replacing substrings, so module names holding ``weight``, ``lora`` or ``base`` map as any
other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from surgery.checkpoint.peft_targets import PeftSite, PeftTargets
from surgery.errors import CheckpointError, near_matches
from surgery.sites.marker import AdapterModule, AdapterParameters

__all__ = ["PREFIX", "WEIGHTS_NAME", "PeftKey", "lora_keys", "ia3_key", "expected_keys",
           "bias_keys", "check_keys", "peft_local"]

PREFIX = "base_model.model."
"""What every key of a PEFT adapter file starts with (``PeftModel.base_model.model``)."""

WEIGHTS_NAME = "adapter_model.safetensors"
"""The tensors file of a PEFT adapter directory."""

_SHOWN = 5
"""How many offending keys a message lists before giving the count."""

_HINTS = (
    (".lora_magnitude_vector", "DoRA's magnitude vector"),
    (".lora_magnitude_vector.weight", "DoRA's magnitude vector (PEFT's key has no .weight)"),
    (".lora_embedding_A", "an embedding LoRA layer the settings do not target"),
    (".lora_embedding_B", "an embedding LoRA layer the settings do not target"),
    (".lora_B.bias", "a bias on lora_B (lora_bias)"),
    (".lora_A.weight", "a LoRA layer the settings do not target"),
    (".lora_B.weight", "a LoRA layer the settings do not target"),
    (".ia3_l", "an IA³ layer the settings do not target"),
)


@dataclass(frozen=True)
class PeftKey:
    """Where one key of a PEFT file goes.

    Attributes:
        slot: ``"lora_A"``, ``"lora_B"``, ``"lora_magnitude_vector"`` (DoRA),
            ``"lora_embedding_A"``, ``"lora_embedding_B"``, ``"ia3_l"``, ``"saved"``
            (``modules_to_save``) or ``"bias"`` (a base bias trained with LoRA's ``bias``).
        qname: the qualified name of the layer or saved module (for ``"bias"``: the module
            owning the bias).
        local: for ``"saved"``, the key within that module's ``state_dict``; ``"bias"`` for
            a bias.
        shape: the shape the tensor must have.
        dtype: the dtype of the tensor it replaces (the layer's weight, or the saved
            module's own tensor).
    """

    slot: str
    qname: str
    local: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def lora_keys(qname: str, embedding: bool = False) -> tuple[str, str]:
    """The keys of ``A`` and ``B`` of the LoRA layer at ``qname`` (an embedding's with
    ``embedding``)."""
    if embedding:
        return f"{PREFIX}{qname}.lora_embedding_A", f"{PREFIX}{qname}.lora_embedding_B"
    return f"{PREFIX}{qname}.lora_A.weight", f"{PREFIX}{qname}.lora_B.weight"


def ia3_key(qname: str) -> str:
    """The key of the IA³ vector of the layer at ``qname``."""
    return f"{PREFIX}{qname}.ia3_l"


def peft_local(rel: str, adapter_name: str) -> str:
    """The name under which PEFT saves an adapter parameter, relative to its layer: the
    parameter's name relative to the site graph without the adapter's name
    (``lora_A.default.weight`` → ``lora_A.weight``, ``lora_embedding_A.default`` →
    ``lora_embedding_A``), and for DoRA's magnitude without ``.weight`` as well
    (``lora_magnitude_vector.default.weight`` → ``lora_magnitude_vector``, the key PEFT's
    ``save_pretrained`` writes)."""
    parts = rel.split(".")
    if len(parts) > 1 and parts[1] == adapter_name:
        del parts[1]
    if parts == ["lora_magnitude_vector", "weight"]:
        del parts[1]
    return ".".join(parts)


def _lora_shapes(site: PeftSite) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``A`` and ``B`` at ``site``, as PEFT's layer of that type holds them."""
    if site.embedding:
        return (site.rank, site.in_features), (site.out_features, site.rank)
    if site.kernel:
        ones = (1,) * len(site.kernel)
        return ((site.rank, site.in_features, *site.kernel),
                (site.out_features, site.rank // site.groups, *ones))
    return (site.rank, site.in_features), (site.out_features, site.rank)


def _ia3_shape(site: PeftSite) -> tuple[int, ...]:
    if site.kernel:
        return (1, site.in_features if site.feedforward else site.out_features,
                *(1,) * len(site.kernel))
    return (1, site.in_features) if site.feedforward else (site.out_features, 1)


def expected_keys(model: nn.Module, targets: PeftTargets, kind: str) -> dict[str, PeftKey]:
    """Every key a PEFT file of this adapter holds for ``model``, in module order.

    Args:
        model: the bare model the adapter goes onto.
        targets: its layers and modules to save (:func:`~surgery.checkpoint.peft_targets.
            resolve_peft_targets`).
        kind: ``"lora"`` or ``"ia3"``.
    """
    out: dict[str, PeftKey] = {}
    for site in targets.sites:
        dtype = _weight_dtype(model, site.qname)
        if kind == "lora":
            key_a, key_b = lora_keys(site.qname, site.embedding)
            shape_a, shape_b = _lora_shapes(site)
            slot = "lora_embedding_" if site.embedding else "lora_"
            out[key_a] = PeftKey(slot + "A", site.qname, "", shape_a, dtype)
            out[key_b] = PeftKey(slot + "B", site.qname, "", shape_b, dtype)
            if site.dora:
                shape_m = ((1, site.out_features, *(1,) * len(site.kernel)) if site.kernel
                           else (site.out_features,))
                out[f"{PREFIX}{site.qname}.lora_magnitude_vector"] = PeftKey(
                    "lora_magnitude_vector", site.qname, "", shape_m, dtype)
        else:
            out[ia3_key(site.qname)] = PeftKey("ia3_l", site.qname, "", _ia3_shape(site), dtype)
    for qname in targets.modules_to_save:
        for local, tensor in model.get_submodule(qname).state_dict(keep_vars=True).items():
            out[f"{PREFIX}{qname}.{local}"] = PeftKey("saved", qname, local, tuple(tensor.shape),
                                                      tensor.dtype)
    for key, (owner, param) in bias_keys(model, targets).items():
        out.setdefault(key, PeftKey("bias", owner, "bias", tuple(param.shape), param.dtype))
    return out


def bias_keys(model: nn.Module, targets: PeftTargets) -> dict[str, tuple[str, nn.Parameter]]:
    """The keys of the base biases a LoRA file with ``bias`` = ``targets.bias`` holds, each
    with the qualified name of the module owning the bias and the bias itself, in module
    order (PEFT's ``_get_learnable_bias_state_dict``).

    ``"lora_only"``: the bias of each adapted layer that has one, under
    ``base_model.model.<layer>.base_layer.bias`` (PEFT's layer wraps the base layer).
    ``"all"``: every parameter named ``bias`` outside adapters, the adapted layers' under
    ``.base_layer.bias`` as well, the others under ``base_model.model.<module>.bias``.
    ``"none"``: none.
    """
    if targets.bias == "none":
        return {}
    sites = {s.qname for s in targets.sites}
    inside = {id(p) for m in model.modules() if isinstance(m, (AdapterModule, AdapterParameters))
              for p in m.parameters()}
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not (name == "bias" or name.endswith(".bias")) or id(param) in inside:
            continue
        owner = name.rpartition(".")[0]
        if owner in sites:
            out[f"{PREFIX}{owner}.base_layer.bias"] = (owner, param)
        elif targets.bias == "all":
            out[f"{PREFIX}{name}"] = (owner, param)
    return out


def _weight_dtype(model: nn.Module, qname: str) -> torch.dtype:
    module = model.get_submodule(qname)
    return module.weight.dtype


def check_keys(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, PeftKey], who: str,
               source: str, base_keys: Collection[str] = ()) -> None:
    """Raise unless ``tensors`` holds exactly the ``expected`` keys with their shapes.

    Raises:
        CheckpointError: keys missing, keys not expected, or shapes that differ; the message
            lists the first few of each (then their number), with what each unexpected key
            looks like (DoRA, an embedding, a layer not targeted) and the nearest names
            present for the missing ones.
    """
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{who}: {source} does not fit this model; nothing was loaded."]
    if missing:
        near = near_matches(missing[0], unexpected or list(tensors), n=3)
        parts.append(f"Missing keys: {_listing(missing)}; nearest names present: "
                     f"{', '.join(near) or 'none'}.")
    if unexpected:
        groups: dict[str, list[str]] = {}
        for key in unexpected:
            groups.setdefault(_hint(key, base_keys), []).append(key)
        shown = "; ".join(f"{what}: {_listing(keys)}" for what, keys in groups.items())
        near = near_matches(unexpected[0], expected, n=3)
        parts.append(f"Unexpected keys ({len(unexpected)}): {shown}; nearest expected: "
                     f"{', '.join(near) or 'none'}.")
    if wrong:
        shown = [f"{k} saved {tuple(tensors[k].shape)}, expected {expected[k].shape}"
                 for k in wrong]
        parts.append(f"Shape mismatches: {_listing(shown, len(wrong))}.")
    parts.append("Way out: load it onto the model it was saved from (same sizes and module "
                 "names); the adapter's ranks come from r / rank_pattern in adapter_config.json.")
    raise CheckpointError(" ".join(parts))


def _listing(items: list[str], count: int | None = None) -> str:
    count = len(items) if count is None else count
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({count} in all)" if count > _SHOWN else "")


def _hint(key: str, base_keys: Collection[str]) -> str:
    """What an unexpected key looks like."""
    if not key.startswith(PREFIX):
        return f"not starting with {PREFIX!r}"
    if key[len(PREFIX):].replace(".base_layer.", ".") in base_keys:
        return ("weights of the base model that differ from this model's (PEFT saves "
                "embedding layers after a vocabulary resize; fx-surgery loads adapters only: "
                "resize and load the base model first)")
    return next((what for suffix, what in _HINTS if key.endswith(suffix)), "not a PEFT key")

"""Write a model's LoRA and IA³ adapters as PEFT adapter directories.

::

    surgery.export_peft(adapted, "out/peft/")          # out/peft/ (default), out/peft/<name>/
    peft_model = peft.PeftModel.from_pretrained(base, "out/peft/")

Each adapter becomes the two files ``peft.PeftModel.save_pretrained`` writes,
``adapter_config.json`` and ``adapter_model.safetensors``, in the layout it writes them: the
adapter ``"default"`` at the directory's root, every other one in a subdirectory named after
it (load those with ``PeftModel.from_pretrained(base, "out/peft/b", adapter_name="b")`` or
``peft_model.load_adapter("out/peft/b", adapter_name="b")``).

The settings name the adapted layers exactly: ``target_modules`` is a regex over their
escaped qualified names, ``rank_pattern`` / ``alpha_pattern`` give each layer whose rank or
alpha differs from the most common one (``"^<escaped name>"``), IA³'s
``feedforward_modules`` the same way. Before anything is written, the settings are read
back with PEFT's rules (:mod:`surgery.checkpoint.peft_targets`) and must select exactly the
layers, ranks, scalings and modules the model has; what PEFT's files cannot say is refused.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters.fold import adapter_params
from surgery.adapters.fold_layout import fold_head
from surgery.adapters.merge_state import KIND_LABEL, adapter_inventory, merged_adapters
from surgery.adapters.names import check_adapter_name
from surgery.apply import history, unwrap
from surgery.checkpoint.files import checkpoint_dir, write_json, write_tensors
from surgery.checkpoint.peft_config import CONFIG_NAME, parse_peft_config
from surgery.checkpoint.peft_keys import (
    PREFIX,
    WEIGHTS_NAME,
    bias_keys,
    check_keys,
    expected_keys,
    peft_local,
)
from surgery.checkpoint.peft_params import is_param_adapter, param_adapter_plan
from surgery.checkpoint.peft_settings import ExportLayer, adapter_settings, task_type
from surgery.checkpoint.peft_targets import PeftTargets, resolve_peft_targets
from surgery.errors import AdapterNotFoundError, CheckpointError, ConfigError
from surgery.map.leaves import is_hf_conv1d
from surgery.sites.site_graph import SiteGraph, base_module, site_graphs

__all__ = ["export_peft"]

_WHO = "export_peft"

_OTHER_KINDS = {
    "serial_adapter": "a serial bottleneck adapter (Houlsby)",
    "parallel_adapter": "a parallel bottleneck adapter (He et al.)",
    "prefix": "a prefix (prefix tuning)",
}
"""Adapter kinds PEFT's LoRA / IA³ files cannot hold, as messages name them."""

@dataclass
class _Plan:
    """Everything one adapter directory receives."""

    name: str
    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def export_peft(model: nn.Module, directory: str | os.PathLike[str],
                names: list[str] | tuple[str, ...] | None = None) -> list[Path]:
    """Write LoRA and IA³ adapters of ``model`` as PEFT adapter directories.

    ``peft.PeftModel.from_pretrained(base, directory)`` on the base model (the model
    :func:`surgery.apply_passes` was given) then computes what ``model`` computes with only
    that adapter active (in float32, to within ``1e-6 · (1 + max|y|)``), on ``nn.Linear``,
    transformers ``Conv1D``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers alike.

    Files, per adapter (``<directory>/`` for ``"default"``, ``<directory>/<name>/`` for the
    others, named as given, ``<directory>/test-adapter/``, as PEFT's ``save_pretrained``):
    ``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight``
    ``(rank, in)`` and ``.lora_B.weight`` ``(out, rank)`` (a convolution's ``(rank, in,
    *kernel)`` and ``(out, rank / groups, 1, ...)``; an embedding's ``.lora_embedding_A``
    ``(rank, num_embeddings)`` and ``.lora_embedding_B`` ``(embedding_dim, rank)``: each
    parameter under its own name without the adapter's, see
    :func:`~surgery.checkpoint.peft_keys.peft_local`), or ``base_model.model.<layer>.ia3_l``
    (``(out, 1)``; ``(1, in)`` for input scaling; ``(1, channels, 1, ...)`` on a
    convolution), in the parameters' dtypes, plus the
    state of every module trained fully (``TrainModulePass``) under
    ``base_model.model.<module>.<key>`` (``modules_to_save``; these belong to no adapter, so
    every adapter's files carry them); and ``adapter_config.json`` with ``peft_type``
    ``"LORA"`` or ``"IA3"``, exact targeting (see the module docstring), ``bias`` as the
    adapter's ``LoRAPass(bias=...)`` (with ``"lora_only"`` / ``"all"`` the trained biases
    are in the tensors, under ``base_model.model.<layer>.base_layer.bias`` for an adapted
    layer and ``base_model.model.<module>.bias`` otherwise, PEFT's keys), ``use_dora`` for a
    DoRA adapter (with ``base_model.model.<layer>.lora_magnitude_vector`` ``(out,)``, on a convolution
    ``(1, out, 1, ...)``, in the tensors, PEFT's key), ``use_rslora``
    when every layer's scaling is ``alpha / sqrt(rank)`` (otherwise ``lora_alpha`` is set so
    that ``alpha / rank`` is the layer's scaling), ``lora_dropout``, ``fan_in_fan_out``
    (true when a layer is ``Conv1D``), ``base_model_name_or_path`` from the model's config
    when it has one, and ``task_type`` when the model's class says it (``*ForCausalLM``,
    ``*LMHeadModel``: ``"CAUSAL_LM"``; a classification or question-answering model when
    its head is trained fully, since PEFT then trains that head).

    An adapter merged into the weights (``MergeLoRAPass`` / ``MergeIA3Pass``) is exported
    from its factors, with a warning: PEFT's files always apply to the unmerged base
    weights, so load them onto the original base model (which then computes what the merged
    model does); no base weight is ever written.

    Args:
        model: an adapted model (a ``torch.compile`` or DDP wrapper is taken off; the keys
            are the bare model's).
        directory: where to write; created if needed.
        names: the adapters to write; ``None``: every adapter of the model.

    Returns:
        The directory of each adapter written, in the order of ``names`` (``"default"``
        first when ``names`` is ``None``).

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        ConfigError: a name in ``names`` breaks the rule of
            :func:`~surgery.adapters.names.check_adapter_name`.
        CheckpointError: the model carries no adapter; an adapter PEFT's LoRA / IA³ files
            cannot express: a serial or parallel bottleneck adapter, a prefix, one name
            holding both LoRA and IA³, LoRA with different dropouts at different layers
            (embeddings, which have none, aside), an adapter DoRA at some layers and plain
            LoRA at others, LoRA on a convolution with a dilation or
            a padding mode (PEFT's ``lora_A`` ignores them), an adapter on the model itself
            (not on a named layer), an adapter whose pass rewrote the base weight
            (``LoRAPass(init="pissa" | "pissa_niter_<K>" | "olora")``); a module trained fully whose
            parameter is tied to a module not trained (PEFT trains an untied copy); settings
            PEFT would read differently (a module name that PEFT's suffix rules for
            ``modules_to_save`` cannot single out); ``directory`` is a file; an adapter name
            that is an absolute path (its directory would lie outside). Checked for every
            adapter before anything is written: on error no file is written.
    """
    bare = unwrap(model)[0]
    root = checkpoint_dir(directory, _WHO, must_exist=False)
    inventory = adapter_inventory(bare)
    chosen = _choose(inventory, names)
    trained = _trained(bare)
    plans = [_plan(bare, name, inventory[name], trained, root) for name in chosen]
    for plan in plans:
        on_meta = [k for k, t in plan.tensors.items() if t.is_meta]
        if on_meta:
            raise CheckpointError(f"{_WHO}: {len(on_meta)} tensor(s) of adapter {plan.name!r} are "
                                  f"on the meta device and hold no values ({on_meta[0]}, ...). "
                                  f"Way out: materialise the model first.")
        if plan.directory.exists() and not plan.directory.is_dir():
            raise CheckpointError(f"{_WHO}: {str(plan.directory)!r} is a file; adapter "
                                  f"{plan.name!r} goes into a directory of that name.")
    _warn_merged(bare, chosen)
    for plan in plans:
        write_tensors(plan.tensors, plan.directory / WEIGHTS_NAME, metadata={"format": "pt"})
        write_json(plan.config, plan.directory / CONFIG_NAME)
    return [plan.directory for plan in plans]


# --------------------------------------------------------------------------- choosing


def _choose(inventory: dict[str, dict[str, list[str]]],
            names: list[str] | tuple[str, ...] | None) -> list[str]:
    if not inventory:
        raise CheckpointError(f"{_WHO}: the model carries no adapter. Way out: "
                              f"export the model apply_passes(model, [LoRAPass(...)]) returns.")
    if names is None:
        chosen = sorted(inventory, key=lambda n: n != "default")
    else:
        if isinstance(names, str):
            names = [names]
        chosen = list(dict.fromkeys(names))
        if not chosen:
            raise ConfigError(f"{_WHO}: names is an empty list; give adapter names, or None to "
                              f"export all of them ({', '.join(map(repr, inventory))}).")
        for name in chosen:
            check_adapter_name(_WHO, name, field="names")
            if name not in inventory:
                raise AdapterNotFoundError(
                    f"{_WHO}: the model has no adapter named {name!r}; it has "
                    f"{', '.join(map(repr, inventory))}.")
    for name in chosen:
        kinds = list(inventory[name])
        other = [k for k in kinds if k not in KIND_LABEL]
        if other:
            what = _OTHER_KINDS.get(other[0], f"a {other[0]} adapter")
            raise CheckpointError(
                f"{_WHO}: adapter {name!r} is {what}; PEFT's LoRA and IA³ files cannot hold it. "
                f"Nothing was written. Way out: export_peft(model, directory, names=[...]) "
                f"with the LoRA / IA³ adapters only, and surgery.save_adapters for the rest.")
        if len(kinds) > 1:
            raise CheckpointError(
                f"{_WHO}: adapter {name!r} holds both LoRA and IA³; a PEFT adapter is one "
                f"method. Nothing was written. Way out: give the two passes different names "
                f"(LoRAPass(name=...), IA3Pass(name=...)) and export each.")
    return chosen


def _trained(model: nn.Module) -> list[str]:
    """Qualified names of the modules trained fully (every name of a shared one)."""
    state = getattr(model, "_surgery", None)
    return list(getattr(state, "trained_modules", None) or ())


# --------------------------------------------------------------------------- planning


def _plan(model: nn.Module, name: str, kinds: dict[str, list[str]], trained: list[str],
          root: Path) -> _Plan:
    kind = next(iter(kinds))
    if kind == "lora" and is_param_adapter(model, name):  # PEFT's target_parameters
        config, tensors = param_adapter_plan(model, name, trained)
        return _Plan(name, root if name == "default" else root / name, config, tensors)
    _refuse_rewritten_base(model, name)
    layers = _layers(model, name, kind)
    _refuse_tied(model, trained)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for local, tensor in layer.tensors.items():
            tensors[f"{PREFIX}{layer.qname}.{local}"] = tensor
    for qname in trained:
        for local, tensor in model.get_submodule(qname).state_dict().items():
            tensors[f"{PREFIX}{qname}.{local}"] = tensor
    tensors = {k: v.detach().clone() for k, v in tensors.items()}  # tied tensors: one copy each
    config, targets = _config(model, name, kind, layers, trained)
    for key, (_, param) in bias_keys(model, targets).items():  # LoRA's bias="lora_only"/"all"
        tensors.setdefault(key, param.detach().clone())
    try:  # the layout PEFT (and import_peft) will expect
        check_keys(tensors, expected_keys(model, targets, kind), _WHO,
                   f"the tensors of adapter {name!r}")
    except CheckpointError as exc:
        raise CheckpointError(f"{_WHO}: adapter {name!r} cannot be written in the layout PEFT "
                              f"reads. Nothing was written. ({exc})") from None
    if name != "default" and os.path.isabs(name):  # root / "/x" is "/x", outside root
        raise CheckpointError(f"{_WHO}: adapter {name!r} would go to its own directory "
                              f"<directory>/<name>, as PEFT's, but the name is an absolute "
                              f"path. Nothing was written. Way out: copy it under another name, "
                              f"combine_adapters(model, {{{name!r}: 1.0}}, name='...'), and "
                              f"export that.")
    return _Plan(name, root if name == "default" else root / name, config, tensors)


def _bias_mode(model: nn.Module, name: str) -> str:
    """The ``bias`` setting of the LoRA pass that added adapter ``name``
    (``LoRAPass(bias=...)``: ``"none"``, ``"lora_only"`` or ``"all"``), as PEFT's
    ``LoraConfig.bias``; the last such pass wins."""
    mode = "none"
    for result in history(model):
        step = result.step
        if result.pass_name == "lora" and getattr(step, "adapter_name", None) == name:
            mode = getattr(step, "bias", "none")
    return mode


def _refuse_rewritten_base(model: nn.Module, name: str) -> None:
    """An adapter whose pass rewrote the base weight when it was added (PiSSA, OLoRA:
    ``LoRAPass(init="pissa")`` leaves the residual ``W - s·B₀A₀`` in the layer) applies to
    that residual, not to the base model PEFT's files are loaded onto.

    Raises:
        CheckpointError: naming the adapter, the weight and the way out.
    """
    for result in history(model):
        for change in result.changes:
            if (change.kind == "param_rewritten" and change.adapter == name
                    and change.pass_name == result.pass_name
                    and any(c.kind == "param_added" and c.adapter == name and c.site == change.site
                            for c in result.changes)):
                raise CheckpointError(
                    f"{_WHO}: adapter {name!r} was added with a base-rewriting initialisation "
                    f"({change.detail}: {change.name}); PEFT's files apply to the original "
                    f"base weights, so the exported adapter would not compute what the model "
                    f"does. Nothing was written. Way out: save_adapters (which replays the "
                    f"rewrite), or unload the model and save it whole.")


def _layers(model: nn.Module, name: str, kind: str) -> list[ExportLayer]:
    out = []
    for qname, sg in site_graphs(model):
        head = fold_head(sg, (kind, name))
        if head is None:
            continue
        base = base_module(sg)
        if not qname:
            raise CheckpointError(
                f"{_WHO}: adapter {name!r} adapts the model itself ({type(base).__name__}), "
                f"not a named layer; PEFT adapts submodules only. Nothing was written. Way "
                f"out: wrap the layer in a module (nn.Sequential(layer)) before adapting it.")
        conv1d = is_hf_conv1d(base)
        out.append(_lora_layer(sg, qname, name, head, conv1d) if kind == "lora"
                   else _ia3_layer(sg, qname, name, head, conv1d))
    if not out:
        raise CheckpointError(f"{_WHO}: adapter {name!r} sits on no layer PEFT can adapt "
                              f"(no LoRA / IA³ site graph carries it). Nothing was written.")
    if kind == "lora":
        rates = {layer.dropout for layer in out if layer.dropout is not None}
        if len(rates) > 1:
            raise CheckpointError(
                f"{_WHO}: LoRA adapter {name!r} has different dropouts at different layers "
                f"({sorted(rates)}); PEFT's lora_dropout is one number for the adapter. Nothing "
                f"was written. Way out: one dropout for the adapter.")
        dora = [layer.qname for layer in out if layer.dora]
        if dora and len(dora) != len(out):
            plain = [layer.qname for layer in out if not layer.dora]
            raise CheckpointError(
                f"{_WHO}: LoRA adapter {name!r} is DoRA at {', '.join(dora[:3])} but plain "
                f"LoRA at {', '.join(plain[:3])}; PEFT's use_dora is one setting for the "
                f"adapter. Nothing was written. Way out: export DoRA and plain LoRA under "
                f"different adapter names.")
    return out


def _lora_layer(sg: SiteGraph, qname: str, name: str, head: nn.Module, conv1d: bool) -> ExportLayer:
    """The adapter's parameters at one layer, under PEFT's names: since the parameter names
    are PEFT's, each goes by its own name with the adapter's taken out (the shapes are
    checked against PEFT's layer of that type later, :func:`_plan`)."""
    factors = head.low_rank(sg)
    if factors is None:
        raise CheckpointError(f"{_WHO}: LoRA adapter {name!r} at {qname} is not a low-rank "
                              f"update B A; PEFT's LoRA files cannot hold it.")
    lora_a, _, scaling = factors
    tensors = {peft_local(rel, name): param for rel, param in adapter_params(sg, ("lora", name))}
    drop = sg._modules.get("lora_dropout")
    p = float(getattr(drop[name], "p", 0.0)) if drop is not None and name in drop else None
    alpha = getattr(head, "alpha", None)
    return ExportLayer(qname, conv1d, tensors, rank=int(lora_a.shape[0]),
                  alpha=float(alpha) if alpha is not None else None, scaling=float(scaling),
                  dropout=p, dora=head.fold_mode == "dora")


def _ia3_layer(sg: SiteGraph, qname: str, name: str, head: nn.Module, conv1d: bool) -> ExportLayer:
    """The adapter's vector at one layer: its parameter ``ia3_l.<name>`` has PEFT's name and
    shape, except on a fused qkv layer learning only the key and value slices, which PEFT
    holds as one whole-layer vector ``(out, 1)`` (ones on the query slice)."""
    vector = getattr(head, "vector", None)
    held = adapter_params(sg, ("ia3", name))
    if head.fold_mode not in ("input", "output") or not callable(vector) or len(held) != 1:
        raise CheckpointError(f"{_WHO}: IA³ adapter {name!r} at {qname} is not a scaling "
                              f"vector; PEFT's IA³ files cannot hold it.")
    rel, param = held[0]
    full = vector(param).detach()
    tensor = param if full.numel() == param.numel() else full.reshape(-1, 1)
    return ExportLayer(qname, conv1d, {peft_local(rel, name): tensor},
                       feedforward=head.fold_mode == "input")


def _refuse_tied(model: nn.Module, trained: list[str]) -> None:
    """PEFT trains a copy of each module in ``modules_to_save``: a parameter the module
    shares with a module not trained would be untied in PEFT and trained here."""
    if not trained:
        return
    inside = {id(p) for q in trained for p in model.get_submodule(q).parameters()}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0]
        if id(param) in inside and not any(owner == q or owner.startswith(q + ".")
                                           for q in trained):
            raise CheckpointError(
                f"{_WHO}: a module trained fully shares the parameter {pname} with a module "
                f"that is not trained ({owner}); PEFT's modules_to_save trains an untied copy, "
                f"so its files cannot reproduce this model. Nothing was written. Way out: "
                f"train the other module fully too, or untie the weights before training.")


# --------------------------------------------------------------------------- settings


def _config(model: nn.Module, name: str, kind: str, layers: list[ExportLayer],
            trained: list[str]) -> tuple[dict[str, Any], PeftTargets]:
    """The settings, read back with PEFT's rules before they are returned with the
    targets PEFT reads from them."""
    task = task_type(model)
    candidates = [task, None] if task not in (None, "CAUSAL_LM") else [task]
    last: CheckpointError | None = None
    for task in candidates:
        config = adapter_settings(model, kind, layers, trained, task)
        if kind == "lora":
            config["bias"] = _bias_mode(model, name)
        try:
            return config, _verify(model, name, kind, config, layers, trained)
        except CheckpointError as exc:
            last = exc
    assert last is not None
    raise last


def _verify(model: nn.Module, name: str, kind: str, config: dict[str, Any],
            layers: list[ExportLayer], trained: list[str]) -> PeftTargets:
    """Read ``config`` back with PEFT's rules; it must select exactly ``layers`` (with their
    ranks and scalings, or feed-forward flags) and ``trained``. Returns what it read."""
    settings = parse_peft_config(config, _WHO, source=f"the settings of adapter {name!r}")
    targets: PeftTargets = resolve_peft_targets(model, settings, name, _WHO)
    got = [site.qname for site in targets.sites]
    want = [layer.qname for layer in layers]
    if got != want:
        extra = sorted(set(got) - set(want))
        lost = sorted(set(want) - set(got))
        raise CheckpointError(
            f"{_WHO}: PEFT would read the settings of adapter {name!r} as targeting other "
            f"layers (also {extra[:5]}, not {lost[:5]}). Nothing was written.")
    for site, layer in zip(targets.sites, layers):
        if kind == "lora":
            scaling = site.alpha / (math.sqrt(site.rank) if settings.use_rslora else site.rank)
            if site.rank != layer.rank or not math.isclose(scaling, layer.scaling, rel_tol=1e-9):
                raise CheckpointError(
                    f"{_WHO}: PEFT would read rank {site.rank}, scaling {scaling:g} at "
                    f"{site.qname} for adapter {name!r}, which has rank {layer.rank}, scaling "
                    f"{layer.scaling:g}. Nothing was written.")
        elif site.feedforward != layer.feedforward:
            raise CheckpointError(f"{_WHO}: PEFT would scale the "
                                  f"{'input' if site.feedforward else 'output'} of {site.qname}, "
                                  f"adapter {name!r} scales the other. Nothing was written.")
    if set(targets.modules_to_save) != set(trained):
        extra = sorted(set(targets.modules_to_save) - set(trained))
        raise CheckpointError(
            f"{_WHO}: PEFT's modules_to_save matches names by their ending, so "
            f"{', '.join(trained)} would also select {', '.join(extra[:5])} (which is not "
            f"trained here). Nothing was written. Way out: train those modules fully too, or "
            f"rename the modules.")
    return targets


def _warn_merged(model: nn.Module, chosen: list[str]) -> None:
    merged = merged_adapters(model)
    if not merged:
        return
    labels = sorted({label for labels in merged.values() for label in labels})
    mine = [label for label in labels if label.partition(":")[2] in chosen]
    warnings.warn(
        f"{_WHO}: adapters merged into this model's weights: {', '.join(labels)}. PEFT's files "
        f"hold adapter factors only and apply to the unmerged base weights: load them onto the "
        f"original base model"
        + (f" (for {', '.join(mine)}, that computes what the merged model does)" if mine else "")
        + ". Base weights are never written.", UserWarning, stacklevel=3)

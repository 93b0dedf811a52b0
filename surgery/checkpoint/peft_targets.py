"""PEFT's targeting, resolved to exact qualified module names.

PEFT decides which layers an adapter sits on from ``adapter_config.json`` and the model's
module names, with rules of its own (:mod:`surgery.checkpoint.peft_config` lists the
settings). :func:`resolve_peft_targets` applies those rules to a model and returns the
exact names, so that the passes fx-surgery then builds select exactly those layers (by
``re:`` + the escaped name) and nothing else. The rules, as PEFT applies them, module by
module in ``named_modules()`` order (the root excluded):

1. *Excluded* when ``exclude_modules`` matches (a regex string: whole name; a list: equal
   to the name or a dot-suffix of it), or when the name is, or lies inside, a module of
   ``modules_to_save`` (each entry a regex ending at a dot boundary).
2. *Targeted* when ``target_modules`` matches: a regex string against the whole name; a
   list when it holds the name itself, or a dot-suffix of it and, with
   ``layers_to_transform``, the layer index passes. The index is the number after the
   first segment named by ``layers_pattern`` (or, without it, after the second segment or
   later); a name without one is not targeted. ``"all-linear"`` stands for the names of
   every ``nn.Linear`` and ``Conv1D`` except the output layer of a transformers model (or,
   for ``SEQ_CLS`` without one, its ``score`` / ``classifier`` head).
3. LoRA's rank and alpha: the first key of ``rank_pattern`` / ``alpha_pattern`` (a regex)
   that matches the end of the name at a dot boundary, else ``r`` / ``lora_alpha``. IA³
   scales the input of the layers ``feedforward_modules`` matches (a regex string: whole
   name; a list: plain name endings, no dot boundary), the output of the others.
4. ``modules_to_save``: every module (shared ones under each name) whose name ends with
   an entry (plain ending, no dot boundary) is trained fully.

PEFT sees the model as the user wrote it: in a model fx-surgery already adapted, adapter
modules and their slots are not names PEFT would see, and a site graph stands for the module
it replaced (:func:`peft_view`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from surgery.checkpoint.peft_config import PeftSettings
from surgery.errors import CheckpointError, near_matches
from surgery.map.leaves import is_hf_conv1d
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import SiteGraph, base_module

__all__ = ["PeftSite", "PeftTargets", "PeftView", "peft_view", "resolve_peft_targets",
           "peft_inserted_names"]

_LORA_SLOTS = ("base_layer", "lora_dropout", "lora_A", "lora_B", "lora_embedding_A",
               "lora_embedding_B", "lora_magnitude_vector")
_IA3_SLOTS = ("base_layer", "ia3_l")
_PER_ADAPTER = ("lora_dropout", "lora_A", "lora_B", "lora_magnitude_vector")
"""Modules PEFT puts inside each layer it adapts (the ``ModuleDict`` slots, and the
per-adapter entries of those that hold modules): names a ``modules_to_save`` entry must
not reach."""

_NOTHING = {"import_peft": "Nothing was loaded.", "export_peft": "Nothing was written."}


@dataclass(frozen=True)
class PeftSite:
    """One layer a PEFT adapter sits on.

    Attributes:
        qname: qualified module name.
        conv1d: the layer is transformers' ``Conv1D`` (weight stored ``(in, out)``).
        in_features / out_features: the layer's sizes (a convolution's channels; an
            embedding's ``num_embeddings`` and ``embedding_dim``, as PEFT counts them).
        rank / alpha: LoRA's rank and alpha at this layer (``0`` for IA³).
        feedforward: IA³ scales this layer's input (``False``: its output).
        kernel: a convolution's kernel size (``()`` for any other layer).
        groups: a convolution's ``groups`` (1 otherwise).
        embedding: the layer is an ``nn.Embedding``.
        dora: the LoRA adapter is DoRA (``use_dora``): the layer also has a magnitude
            vector, ``(out_features,)`` on ``nn.Linear`` / ``Conv1D``, ``(1, out_features,
            1, ..., 1)`` on a convolution (not on embeddings).
    """

    qname: str
    conv1d: bool
    in_features: int
    out_features: int
    rank: int = 0
    alpha: float = 0.0
    feedforward: bool = False
    kernel: tuple[int, ...] = ()
    groups: int = 1
    embedding: bool = False
    dora: bool = False


@dataclass(frozen=True)
class PeftTargets:
    """Where a PEFT adapter goes in a model.

    Attributes:
        sites: the adapted layers, in module order.
        modules_to_save: qualified names of the modules trained fully, in module order.
        bias: LoRA's ``bias`` (``"none"``, ``"lora_only"``, ``"all"``): which base biases
            the file holds and the adapter trains.
    """

    sites: tuple[PeftSite, ...]
    modules_to_save: tuple[str, ...]
    bias: str = "none"


@dataclass(frozen=True)
class PeftView:
    """A model's modules as PEFT would see them.

    Attributes:
        modules: ``(qualified name, module as the user wrote it)`` in ``named_modules()``
            order, each module once (under its first name), the root excluded.
        all_names: every qualified name, shared modules under each of their names.
        aliases: first name -> every name of a module registered as a child in several
            places (PEFT replaces such a module in the first place only).
    """

    modules: tuple[tuple[str, nn.Module], ...]
    all_names: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]]


def peft_view(model: nn.Module) -> PeftView:
    """The modules of ``model`` without fx-surgery's adapters (see :class:`PeftView`)."""
    modules: list[tuple[str, nn.Module]] = []
    names: list[str] = []
    first: dict[int, list[str]] = {}
    slots: dict[int, set[tuple[int, str]]] = {}  # where each module is registered

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if (child is None or isinstance(child, (AdapterModule, AdapterParameters))
                    or _adapter_slot(module, child)):
                continue
            qname = prefix + name
            names.append(qname)
            slots.setdefault(id(child), set()).add((id(module), name))
            if id(child) in first:
                first[id(child)].append(qname)
            else:
                first[id(child)] = [qname]
                modules.append((qname, base_module(child)))
            walk(child, qname + ".")

    walk(model, "")
    # a module registered in two places (not merely reached through a shared parent): PEFT
    # replaces it in the first place only
    shared = {group[0]: tuple(group) for key, group in first.items() if len(slots[key]) > 1}
    return PeftView(tuple(modules), tuple(names), shared)


def _adapter_slot(parent: nn.Module, child: nn.Module) -> bool:
    """A site graph's ``ModuleDict`` of adapter modules (``lora_A``, ``ia3``, ...)."""
    return (isinstance(parent, SiteGraph) and isinstance(child, nn.ModuleDict) and len(child) > 0
            and all(isinstance(m, AdapterModule) for m in child.values()))


def peft_inserted_names(kind: str, qname: str, adapter_name: str) -> list[str]:
    """The names of the modules PEFT puts inside a layer it adapts with LoRA or IA³."""
    slots = _LORA_SLOTS if kind == "lora" else _IA3_SLOTS
    out = [f"{qname}.{slot}" for slot in slots]
    if kind == "lora":
        out += [f"{qname}.{slot}.{adapter_name}" for slot in _PER_ADAPTER]
    return out


# --------------------------------------------------------------------------- resolution


def resolve_peft_targets(model: nn.Module, settings: PeftSettings, adapter_name: str,
                         who: str) -> PeftTargets:
    """The exact layers and trained modules of a PEFT adapter in ``model``.

    Args:
        model: the bare model (no ``torch.compile`` / DDP wrapper); it may already carry
            fx-surgery adapters, which PEFT's rules do not see.
        settings: the adapter's checked settings.
        adapter_name: the name the adapter gets (PEFT puts it into module names, which
            ``modules_to_save`` must not reach).
        who: the calling function, for messages.

    Raises:
        CheckpointError: the settings target no module; a targeted module is not a layer
            fx-surgery adapts the way PEFT does (``nn.MultiheadAttention``, a subclass of a
            convolution or embedding with a forward of its own, IA³ on ``nn.Conv1d``: PEFT
            adapts those, fx-surgery does not; any other type: PEFT cannot either); LoRA
            on a convolution with a dilation or a padding mode PEFT's ``lora_A`` ignores;
            or ``modules_to_save`` reaches an adapted layer, a module PEFT inserts, or
            modules nested in one another; DoRA (``use_dora``) on an embedding.
    """
    nothing = _NOTHING.get(who, "")
    view = peft_view(model)
    kind = "lora" if settings.peft_type == "LORA" else "ia3"
    targets = settings.target_modules
    if targets == "all-linear":
        targets = _all_linear(model, view, settings.task_type)
    saved = settings.effective_modules_to_save
    guards = [_compile(rf"(^|.*\.){m}($|\..*)", "modules_to_save", settings, who) for m in saved]
    sites = []
    for qname, module in view.modules:
        if _excluded(settings, qname) or any(g.match(qname) for g in guards):
            continue
        if not _targeted(settings, targets, qname, who):
            continue
        if qname in view.aliases:
            raise CheckpointError(
                f"{who}: {settings.source} adapts {qname}, a module the model holds under "
                f"several names ({', '.join(view.aliases[qname])}); PEFT replaces it under its "
                f"first name only, so the other places keep the plain module, while "
                f"fx-surgery adapts the module wherever it is used. {nothing}")
        sites.append(_site(kind, settings, qname, module, who))
    if not sites:
        shown = targets if isinstance(targets, str) else sorted(targets)
        near = near_matches(shown if isinstance(shown, str) else (shown or [""])[0],
                            [q for q, _ in view.modules])
        raise CheckpointError(
            f"{who}: {settings.source} targets no module of this model (target_modules="
            f"{shown!r}{', after exclude_modules' if settings.exclude_modules else ''}). "
            f"Nearest module names: {', '.join(near) or 'none'}. {nothing} Way out: load it "
            f"onto the model it was trained for.")
    return PeftTargets(tuple(sites), _modules_to_save(view, saved, sites, kind, adapter_name,
                                                      settings, who), settings.bias)


def _compile(pattern: str, key: str, settings: PeftSettings, who: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(f"{who}: {settings.source}: {key} entry {pattern!r} is not a "
                              f"valid regular expression ({exc}).") from None


def _excluded(settings: PeftSettings, qname: str) -> bool:
    excl = settings.exclude_modules
    if not excl:
        return False
    if isinstance(excl, str):
        return re.fullmatch(excl, qname) is not None
    return qname in excl or any(qname.endswith("." + e) for e in excl)


def _targeted(settings: PeftSettings, targets: str | tuple[str, ...] | frozenset[str],
              qname: str, who: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, qname) is not None
    if qname in targets:  # named exactly: the layer filter does not apply
        return True
    if not any(qname.endswith("." + t) for t in targets):
        return False
    layers = settings.layers_to_transform
    if layers is None or (isinstance(layers, tuple) and not layers):
        return True
    index = _layer_index(settings, qname)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(settings: PeftSettings, qname: str) -> int | None:
    """The layer number in ``qname`` as PEFT reads it (the first numbered segment after a
    ``layers_pattern`` segment, or after the second segment or later)."""
    if not settings.layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", qname)
    else:
        found = None
        for pat in settings.layers_pattern:
            found = re.match(rf"(?:^|.*?\.){pat}\.(\d+)\.", qname)
            if found is not None:
                break
    return int(found.group(1)) if found else None


def _site(kind: str, settings: PeftSettings, qname: str, module: nn.Module, who: str) -> PeftSite:
    conv1d = is_hf_conv1d(module)
    shape: dict = {}
    if isinstance(module, nn.Linear) or conv1d:
        rows, cols = module.weight.shape
        in_f, out_f = (rows, cols) if conv1d else (cols, rows)  # Conv1D stores (in, out)
    elif _plain(module, _CONVS[kind]):
        _refuse_geometry(settings, qname, module, who)
        in_f, out_f = module.in_channels, module.out_channels
        shape = dict(kernel=tuple(module.kernel_size), groups=int(module.groups))
    elif kind == "lora" and _plain(module, (nn.Embedding,)):
        in_f, out_f = module.num_embeddings, module.embedding_dim
        shape = dict(embedding=True)
    else:
        _refuse_type(kind, settings, qname, module, who)
    if kind == "ia3":
        ff = settings.feedforward_modules
        feedforward = (re.fullmatch(ff, qname) is not None if isinstance(ff, str)
                       else any(qname.endswith(f) for f in ff))
        return PeftSite(qname, conv1d, int(in_f), int(out_f), feedforward=feedforward, **shape)
    rank = settings.rank_pattern.get(_pattern_key(settings.rank_pattern, qname), settings.r)
    alpha = settings.alpha_pattern.get(_pattern_key(settings.alpha_pattern, qname),
                                       settings.lora_alpha)
    if settings.use_dora and shape.get("embedding"):
        raise CheckpointError(
            f"{who}: {settings.source} puts DoRA (use_dora) on {qname} "
            f"({type(module).__name__}, an embedding); fx-surgery computes DoRA on nn.Linear, "
            f"Conv1D and nn.Conv1d/2d/3d layers only. {_NOTHING.get(who, '')} Way out: target "
            f"those layers only, or merge the adapter into the weights with PEFT "
            f"(merge_and_unload) and use that model.")
    return PeftSite(qname, conv1d, int(in_f), int(out_f), rank=rank, alpha=float(alpha),
                    dora=settings.use_dora, **shape)


_CONVS = {"lora": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "ia3": (nn.Conv2d, nn.Conv3d)}
"""The convolutions each method adapts, in PEFT and here."""


def _plain(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """One of ``types`` running its own torch forward (a subclass that changes the forward,
    Gemma's scaled embedding, computes something PEFT's layer would treat otherwise)."""
    return isinstance(module, types) and type(module).forward in tuple(t.forward for t in types)


def _refuse_geometry(settings: PeftSettings, qname: str, module: nn.Module, who: str) -> None:
    """PEFT's LoRA ``lora_A`` on a convolution takes the layer's kernel, stride and padding
    but neither its dilation nor its padding mode; fx-surgery's follows the layer in both
    (so that a merge is exact). Where they differ, the two compute different things."""
    if settings.peft_type != "LORA":
        return
    odd = []
    if any(d != 1 for d in module.dilation):
        odd.append(f"dilation={tuple(module.dilation)}")
    if module.padding_mode != "zeros":
        odd.append(f"padding_mode={module.padding_mode!r}")
    if settings.use_dora and module.groups > 1:
        raise CheckpointError(
            f"{who}: {settings.source} puts DoRA (use_dora) on {qname} "
            f"({type(module).__name__}, groups={module.groups}); PEFT normalises a grouped "
            f"convolution's DoRA weight by reshaping B·A into the grouped weight's shape, which "
            f"is not that layer's update, while fx-surgery normalises the update itself, so the "
            f"two compute different things once B is trained. {_NOTHING.get(who, '')} Way out: "
            f"keep this adapter in fx-surgery's own files (surgery.save_adapters), or use plain "
            f"LoRA (use_dora=False) on grouped convolutions.")
    if odd:
        raise CheckpointError(
            f"{who}: {settings.source} puts LoRA on {qname} ({type(module).__name__}, "
            f"{', '.join(odd)}); PEFT's lora_A convolution ignores the layer's dilation and "
            f"padding mode, fx-surgery's follows the layer, so the two would compute different "
            f"things. {_NOTHING.get(who, '')} Way out: adapt convolutions with dilation 1 and "
            f"zero padding only, or keep this adapter in fx-surgery's own files "
            f"(surgery.save_adapters).")


def _pattern_key(patterns: dict[str, object], qname: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` matching the end of ``qname``
    at a dot boundary."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", qname)), None)


def _refuse_type(kind: str, settings: PeftSettings, qname: str, module: nn.Module,
                 who: str) -> None:
    label = "LoRA" if kind == "lora" else "IA³"
    typ = type(module).__name__
    peft_can = ((nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
                if kind == "lora" else (nn.Conv2d, nn.Conv3d))
    if isinstance(module, peft_can):
        ours = ("nn.Linear, Conv1D, nn.Conv1d/2d/3d and nn.Embedding" if kind == "lora"
                else "nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d")
        why = ("" if isinstance(module, nn.MultiheadAttention) else  # else a subclass
               f" running torch's own forward ({typ} has a forward of its own)")
        raise CheckpointError(
            f"{who}: {settings.source} puts {label} on {qname} ({typ}); PEFT adapts "
            f"{typ} layers, fx-surgery's {label} adapts {ours}{why}, so it "
            f"cannot reproduce this adapter. {_NOTHING.get(who, '')} Way out: merge the adapter "
            f"into the weights with PEFT (merge_and_unload) and use that model.")
    raise CheckpointError(
        f"{who}: {settings.source}'s target_modules select {qname} ({typ}), a module "
        f"{label} cannot adapt (PEFT refuses it too). {_NOTHING.get(who, '')} Way out: load it "
        f"onto the model it was trained for.")


def _all_linear(model: nn.Module, view: PeftView, task_type: str | None) -> frozenset[str]:
    """The names ``target_modules="all-linear"`` stands for."""
    names = {q for q, m in view.modules if isinstance(m, nn.Linear) or is_hf_conv1d(m)}
    head = None
    if any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        head = model.get_output_embeddings()
        if head is None and task_type == "SEQ_CLS":
            head = next((getattr(model, n) for n in ("score", "classifier")
                         if getattr(model, n, None) is not None), None)
    if head is not None:
        name = next((q for q, m in model.named_modules() if m is head), None)
        names.discard(name)
    return frozenset(names)


def _modules_to_save(view: PeftView, saved: tuple[str, ...], sites: list[PeftSite], kind: str,
                     adapter_name: str, settings: PeftSettings, who: str) -> tuple[str, ...]:
    if not saved:
        return ()
    inserted = [n for s in sites for n in peft_inserted_names(kind, s.qname, adapter_name)]
    for name in inserted:
        hit = next((m for m in saved if name.endswith(m)), None)
        if hit is not None:
            raise CheckpointError(
                f"{who}: {settings.source}: modules_to_save entry {hit!r} reaches {name}, a "
                f"module PEFT inserts into the layers it adapts. {_NOTHING.get(who, '')} Way "
                f"out: an entry naming the module to train (its full qualified name).")
    chosen = list(dict.fromkeys(n for n in view.all_names if any(n.endswith(m) for m in saved)))
    site_names = [s.qname for s in sites]
    for name in chosen:
        clash = next((q for q in site_names if _nested(name, q) or q == name), None)
        what = "an adapted layer"
        if clash is None:
            clash = next((q for q in chosen if _nested(name, q)), None)
            what = "another module to save"
        if clash is not None:
            raise CheckpointError(
                f"{who}: {settings.source}: modules_to_save selects {name}, which "
                f"{'is' if clash == name else 'overlaps'} {what} ({clash}); one module cannot "
                f"be both trained fully and adapted, or trained twice. {_NOTHING.get(who, '')}")
    return tuple(chosen)


def _nested(a: str, b: str) -> bool:
    """One of the qualified names lies inside the other."""
    return a.startswith(b + ".") or b.startswith(a + ".")

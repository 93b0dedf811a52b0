"""Runs of the model on its example inputs for :class:`passes.prefix.PrefixPass` sequence
prefixes: one that records the input of each selected module, and the dry run that checks
the prefixes before the pass returns.

A sequence prefix makes a module's input ``P`` positions longer. That only works when the
longer sequence reaches the model's output without meeting a value whose length is fixed
by something else: an attention mask built from the inputs, a residual add of the
unprefixed sequence, position ids, a reshape to a recorded size. Which of these stands in
the way is a property of the whole graph, so the check runs the adapted model once on the
example inputs recorded at tracing, with a length-1 prefix at every new site.

The run is side-effect free for the model: every module is put in eval mode (no dropout,
no batch-norm statistics) and its flag restored afterwards, the global RNG state is
restored, the stored prefixes are swapped back in, and no gradients are recorded.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from passes.prefix_modules import SequencePrefix
from surgery.errors import UnsupportedSiteError
from surgery.map.graphs import recompile
from surgery.sites.site_graph import base_module

__all__ = ["SequenceSite", "check_sequence_sites", "example_inputs", "record_inputs"]


@dataclass(frozen=True)
class SequenceSite:
    """One module whose first input got a sequence prefix.

    Attributes:
        name: its qualified name.
        module: its site graph (its ``prefix`` slot holds the new :class:`SequencePrefix`).
        shape: the shape of its input on the example inputs, ``(batch, seq, d)``.
        dtype: the dtype of that input.
    """

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    dtype: torch.dtype


def example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """The example inputs recorded on ``model._surgery`` (``apply_passes(...,
    example_inputs=, example_kwargs=)``), or ``None``."""
    state = getattr(model, "_surgery", None)
    args = getattr(state, "example_inputs", None)
    kwargs = getattr(state, "example_kwargs", None)
    if args is None and kwargs is None:
        return None
    return tuple(args or ()), dict(kwargs or {})


def record_inputs(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor | None]:
    """The first input of each module in ``names`` when ``model`` runs on its example inputs.

    One run, in eval mode, without gradients, the RNG state and every training flag restored.
    A module whose first input is not a tensor, or that the run does not reach, maps to
    ``None``.

    Raises:
        UnsupportedSiteError: no example inputs were recorded, or the model fails on them;
            chained from the run's error.
    """
    inputs = example_inputs(model)
    if inputs is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot tell the shape of the input of {', '.join(names)}: no example "
            f"inputs were given, so nothing records shapes, and mode='sequence' needs a "
            f"(batch, seq, d) floating-point input. Way out: pass example_inputs=... (and "
            f"example_kwargs=...) to apply_passes.")
    seen: dict[str, torch.Tensor | None] = {name: None for name in names}
    handles = []

    def hook(name: str) -> object:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if seen[name] is None and isinstance(first, torch.Tensor):
                seen[name] = first.detach()
        return record

    for name in names:
        mod = model.get_submodule(name) if name else model
        handles.append(mod.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with torch.random.fork_rng(devices=[]), _quiet_eval(model):
            error = _failure(model, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    if error is not None:
        raise UnsupportedSiteError(
            f"PrefixPass: the model fails on its example inputs before any prefix is added "
            f"({type(error).__name__}: {error}). Way out: give example_inputs= / "
            f"example_kwargs= that the model accepts.") from error
    return seen


def check_sequence_sites(model: nn.Module, sites: Sequence[SequenceSite],
                         adapter_name: str) -> None:
    """Run ``model`` once on its recorded example inputs with a prefix at every site.

    Each site's prefix is replaced for the run by a :class:`SequencePrefix` of length 1
    (so a ``P = 0`` prefix is checked too). When the run fails, each site is tried alone
    to name the one at fault. ``model``'s site graphs are recompiled first.

    Args:
        model: the adapted model, already edited (``model._surgery`` holds the example
            inputs and keyword inputs given to ``apply_passes``).
        sites: the sites the pass just adapted.
        adapter_name: the name under which their prefixes are registered.

    Raises:
        UnsupportedSiteError: no example inputs were recorded, or the run fails; chained
            from the run's error.
    """
    if not sites:
        return
    names = ", ".join(s.name for s in sites)
    inputs = example_inputs(model)
    if inputs is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot check the sequence prefix at {names}: no example inputs were "
            f"given. Way out: pass example_inputs=... to apply_passes.")
    recompile(model)
    with _probes(sites, adapter_name) as probes, _quiet_eval(model):
        error = _failure(model, *inputs)
        if error is None:
            return
        culprit = None
        if len(sites) > 1:
            for i, site in enumerate(sites):
                for j, probe in enumerate(probes):
                    probe.active = i == j
                alone = _failure(model, *inputs)
                if alone is not None:
                    culprit, error = site, alone
                    break
    if culprit is None and len(sites) == 1:
        culprit = sites[0]
    where = names if culprit is None else (
        f"{culprit.name} ({type(base_module(culprit.module)).__name__}, input {culprit.dtype} "
        f"{culprit.shape})")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise UnsupportedSiteError(
        f"PrefixPass: a sequence prefix at {where} makes the model fail on its recorded "
        f"example inputs ({type(error).__name__}: {first}). The longer sequence meets a value "
        f"whose length is fixed by other inputs (an attention mask, a residual add, position "
        f"ids, a fixed reshape) before it reaches the output. Way out: use mode='sequence' "
        f"only on modules whose sequence length flows to the output (e.g. an "
        f"nn.TransformerEncoder called without masks, or a module taking (batch, seq, d) "
        f"features), or mode='attention' to prefix keys and values.") from error


@contextlib.contextmanager
def _probes(sites: Sequence[SequenceSite], adapter_name: str) -> Iterator[list[SequencePrefix]]:
    """Swap a length-1 :class:`SequencePrefix` in for each site's prefix; restore after."""
    holders = [site.module._modules["prefix"] for site in sites]
    stored = [holder[adapter_name] for holder in holders]
    probes = []
    with torch.random.fork_rng(devices=[]):
        for seq in stored:
            ref = seq.encoder.embedding if seq.encoder is not None else seq.vectors
            probes.append(SequencePrefix(length=1, width=seq.width, seq_dim=seq.seq_dim,
                                         init_std=1.0, site=seq.site, adapter_name=adapter_name,
                                         dtype=ref.dtype, device=ref.device))
        try:
            for holder, probe in zip(holders, probes):
                holder[adapter_name] = probe
            yield probes
        finally:
            for holder, seq in zip(holders, stored):
                holder[adapter_name] = seq


@contextlib.contextmanager
def _quiet_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the run; every module's training flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _failure(model: nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """The exception a run of ``model`` raises, or ``None``. fx's generated-code report on
    stderr is swallowed: the error is what the caller reports."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (any failure of the run is the site's fault)
        return exc
    return None

"""The dry run that checks :class:`passes.prefix.PrefixPass` sequence prefixes before the
pass returns.

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

__all__ = ["SequenceSite", "check_sequence_sites"]


@dataclass(frozen=True)
class SequenceSite:
    """One module whose first input got a sequence prefix.

    Attributes:
        name: its qualified name.
        module: the module (its ``prefix`` slot holds the new :class:`SequencePrefix`).
        shape: the recorded shape of its input, ``(batch, seq, d)`` (see
            :func:`passes.prefix_sites.recorded_shape`).
        dtype: the recorded dtype of its input.
    """

    name: str
    module: nn.Module
    shape: tuple[int | str, ...]
    dtype: torch.dtype


def check_sequence_sites(model: nn.Module, sites: Sequence[SequenceSite],
                         adapter_name: str) -> None:
    """Run ``model`` once on its recorded example inputs with a prefix at every site.

    Each site's prefix is replaced for the run by a :class:`SequencePrefix` of length 1
    (so a ``P = 0`` prefix is checked too). When the run fails, each site is tried alone
    to name the one at fault. ``model``'s graphs are recompiled first.

    Args:
        model: the traced model, already edited (``model._surgery`` holds the example
            inputs and keyword inputs given at tracing).
        sites: the sites the pass just adapted.
        adapter_name: the name under which their prefixes are registered.

    Raises:
        UnsupportedSiteError: no example inputs were recorded, or the run fails; chained
            from the run's error.
    """
    if not sites:
        return
    state = getattr(model, "_surgery", None)
    args = getattr(state, "example_inputs", None)
    kwargs = getattr(state, "example_kwargs", None)
    names = ", ".join(s.name for s in sites)
    if args is None and kwargs is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot check the sequence prefix at {names}: the model was traced "
            f"without example inputs. Way out: pass example_inputs=... to apply_passes (or "
            f"surgery.map.trace).")
    recompile(model)
    with _probes(sites, adapter_name) as probes, _quiet_eval(model):
        error = _failure(model, args or (), kwargs or {})
        if error is None:
            return
        culprit = None
        if len(sites) > 1:
            for i, site in enumerate(sites):
                for j, probe in enumerate(probes):
                    probe.active = i == j
                alone = _failure(model, args or (), kwargs or {})
                if alone is not None:
                    culprit, error = site, alone
                    break
    if culprit is None and len(sites) == 1:
        culprit = sites[0]
    where = names if culprit is None else (
        f"{culprit.name} ({type(culprit.module).__name__}, input {culprit.dtype} "
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

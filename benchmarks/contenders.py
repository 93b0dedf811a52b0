"""The models whose steps are timed, built and checked against each other first.

``plain`` (the model as built), ``plain_again`` (a second one: the A/A control, whose
ratio to ``plain`` shows how much the machine's noise alone moves a ratio), ``peft`` (``get_peft_model`` on its own copy), ``ours`` (LoRA
by pattern) and ``merged`` (``MergeLoRAPass`` on ``ours``). Before anything is timed:

- both adapted models reproduce the plain model's output bitwise at init;
- trainable and total parameter counts agree with PEFT's (asserted);
- given the same adapter weights (``B`` made non-zero), ours and PEFT's outputs agree, and the
  merged model's agree with ours (largest differences recorded);
- merging leaves ``ours`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from cases import Case, build, lora_pattern, merged, output, peft_lora
from torch import nn

import surgery


@dataclass
class Contenders:
    """The step contenders of one case and what was checked about them."""

    models: dict[str, nn.Module]
    counts: dict[str, tuple[int, int]]          # impl -> (trainable, total)
    diff_peft: float                            # max |ours - PEFT| with the same adapters
    diff_merged: float | None                   # max |merged - ours|
    merge_failure: str | None = None
    notes: list[str] = field(default_factory=list)


def counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _same_adapters(ours: nn.Module, theirs: nn.Module) -> int:
    """Give both models the same LoRA weights, ``B`` random (non-zero); returns how many
    tensors were set."""
    mine = dict(surgery.named_trainable_parameters(ours))
    other = dict(theirs.named_parameters())
    gen = torch.Generator().manual_seed(1)
    n = 0
    with torch.no_grad():
        for name, p in mine.items():
            q = other["base_model.model." + name]
            if q.shape != p.shape:
                raise AssertionError(f"{name}: ours {tuple(p.shape)} vs PEFT {tuple(q.shape)}")
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            q.copy_(p)
            n += 1
    return n


def contenders(c: Case) -> Contenders:
    """Build and check the step contenders of case ``c``.

    Raises:
        AssertionError: an output at init differs from the plain model's, or parameter
            counts differ from PEFT's.
    """
    plain = build(c)
    theirs = peft_lora(c, build(c))
    ours = lora_pattern(c, build(c))
    got = {"plain": counts(plain), "peft": counts(theirs), "ours": counts(ours)}
    if got["ours"] != tuple(theirs.get_nb_trainable_parameters()):
        raise AssertionError(f"{c.name}: trainable/total ours {got['ours']} vs PEFT "
                             f"{theirs.get_nb_trainable_parameters()}")
    with torch.no_grad():
        ref = output(plain, c)
        for impl, model in (("peft", theirs), ("ours", ours)):
            if not torch.equal(output(model, c), ref):
                raise AssertionError(f"{c.name}: {impl} output differs from the plain model at init")
        _same_adapters(ours, theirs)
        before = output(ours, c)
        diff_peft = (before - output(theirs, c)).abs().max().item()
    models = {"plain": plain, "peft": theirs, "ours": ours, "plain_again": build(c)}
    try:
        folded = merged(ours)
    except Exception as exc:  # noqa: BLE001 (being ported: report, do not stop the run)
        return Contenders(models, got, diff_peft, None,
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    with torch.no_grad():
        diff_merged = (output(folded, c) - before).abs().max().item()
        if not torch.equal(output(ours, c), before):
            raise AssertionError(f"{c.name}: merging changed the model it was given")
    got["merged"] = counts(folded)
    models["merged"] = folded
    site = next(n for n, _ in folded.named_modules() if n.endswith("." + c.targets[0]))
    now = folded.get_submodule(site)
    kind = "a site graph (`SiteGraph`)" if isinstance(now, surgery.SiteGraph) else f"`{type(now).__name__}`"
    notes = [(f"after merging, `{site}` is {kind}; the plain model has "
             f"`{type(plain.get_submodule(site)).__name__}` there")]
    return Contenders(models, got, diff_peft, diff_merged, notes=notes)

"""The invariant checks run on each model a pipeline produces (DESIGN.md, "Invariants").

- :func:`check_identity`: outputs bitwise equal to the base model's where every adapter
  present promises identity at init (invariant 3).
- :func:`check_trainable`: ``surgery.trainable_parameters`` is exactly the parameters of
  adapters not merged, of modules trained fully and of biases a LoRA pass chose to train;
  after a backward exactly those have a ``.grad``, non-zero where the gradient must reach
  them (invariant 4).
- :func:`check_merge_round_trip`: with adapters set to random values, merging keeps the
  outputs within a stated tolerance and unmerging restores every base weight bit for bit
  and the outputs bit for bit (invariant 6).
- :func:`check_save_load`: ``save_adapters`` / ``load_adapters`` onto the base reproduce
  the outputs bit for bit, with trained (random) adapter values (invariant 6).
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch
from torch import nn

import surgery
from properties.models import ModelCase
from properties.runner import Expectations, names_in_model, outputs
from surgery.sites.marker import slot_parameters

__all__ = ["check_identity", "check_merge_round_trip", "check_save_load", "check_trainable",
           "randomize", "MERGE_TOLERANCE"]

MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
"""How far merged outputs may be from the unmerged model evaluated in float64, beyond twice
the unmerged model's own distance from it (``max|out - truth| / (1 + max|truth|)``), per
weight dtype: one rounding of each merged weight (float32: 2^-24, bfloat16: 2^-9 relative)
grown through a few layers. The unmerged model's own rounding counts because a base
rewritten to a residual (PiSSA, OLoRA) with a large scaling is ill-conditioned in
bfloat16: merged and unmerged then differ by as much as either differs from exact."""


def adapter_parameters(model: nn.Module) -> dict[int, tuple[str, nn.Parameter, surgery.AdapterModule]]:
    """``id -> (name, parameter, owning adapter module)`` of every adapter parameter: those
    of adapter modules, and those of adapters' parameter slots (IA³'s
    ``<layer>.ia3_l.<adapter>``, owned by the adapter's module at that layer)."""
    out: dict[int, tuple[str, nn.Parameter, surgery.AdapterModule]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, surgery.AdapterModule):
            for pname, p in mod.named_parameters(prefix=mname):  # with a prefix's encoder
                out.setdefault(id(p), (pname, p, mod))
    for pname, p, pass_name, adapter_name in slot_parameters(model):
        site = model.get_submodule(pname.rsplit(".", 2)[0] if pname.count(".") >= 2 else "")
        owner = next(m for m in site.modules() if isinstance(m, surgery.AdapterModule)
                     and (m.pass_name, m.adapter_name) == (pass_name, adapter_name))
        out.setdefault(id(p), (pname, p, owner))
    return out


def _merged(model: nn.Module, mod: surgery.AdapterModule) -> bool:
    """Whether ``mod``'s adapter is merged into its layer's weight."""
    label = f"{mod.pass_name}:{mod.adapter_name}"
    return label in surgery.merged_adapters(model).get(mod.site, ())


def expected_trainable(model: nn.Module, exp: Expectations) -> dict[int, str]:
    """``id -> name`` of the parameters that must train."""
    out = {i: n for i, (n, _, mod) in adapter_parameters(model).items() if not _merged(model, mod)}
    for qname in exp.trained_modules:
        for pname, p in model.get_submodule(qname).named_parameters(prefix=qname):
            out.setdefault(id(p), pname)
    state = model._surgery
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname in state.trained_parameters:
        assert pname.rsplit(".", 1)[-1] == "bias", f"{pname} trains alone and is not a bias"
        out.setdefault(id(params[pname]), pname)
    return out


def check_identity(model: nn.Module, case: ModelCase, base_out: torch.Tensor,
                   exp: Expectations) -> None:
    """Outputs equal the base model's bit for bit unless an inexact adapter is present."""
    out = outputs(model, case)
    if exp.inexact & names_in_model(model):
        assert out.dtype == base_out.dtype
        return
    assert out.shape == base_out.shape and torch.equal(out, base_out), (
        f"outputs differ from the base at init: max |diff| "
        f"{(out.float() - base_out.float()).abs().max().item():.3g}")


def _used(name: str, case: ModelCase) -> bool:
    return not any(name == u or name.startswith(u + ".") for u in case.unused)


def _must_reach(name: str, p: nn.Parameter, mod: surgery.AdapterModule | None,
                siblings: dict[str, nn.Parameter]) -> bool:
    """Whether the gradient of ``p`` must be non-zero at this point: not for a factor whose
    partner is zero (LoRA ``A`` with ``B = 0``, an adapter's ``down`` with ``up = 0``, a
    prefix behind a zero gate), nor for an empty prefix."""
    if p.numel() == 0:
        return False
    partner = None
    if ".up.weight" in name:  # behind the activation: all of it may be dead (ReLU); the
        return False          # bias takes the gradient of every position
    for mine, theirs in ((".lora_A.", ".lora_B."), (".lora_embedding_B.", ".lora_embedding_A."),
                         (".down.", ".up.")):
        if mine in name:
            partner = siblings.get(name.replace(mine, theirs).replace(".bias", ".weight"))
    if ".prefix." in name and mod is not None:
        site, _, rest = name.partition(".prefix.")
        gate = siblings.get(f"{site}.prefix_gate.{rest.split('.')[0]}.weight")
        partner = gate
    return partner is None or bool(partner.detach().ne(0).any())


def check_trainable(model: nn.Module, case: ModelCase, exp: Expectations) -> None:
    """Exactly the expected parameters train and, after a backward, hold a gradient."""
    work = copy.deepcopy(model)
    want = expected_trainable(work, exp)
    got = {id(p): n for n, p in surgery.named_trainable_parameters(work)}
    assert set(got) == set(want), (
        f"trainable parameters differ: extra {sorted(got[i] for i in set(got) - set(want))}, "
        f"missing {sorted(want[i] for i in set(want) - set(got))}")
    flagged = {id(p) for p in work.parameters() if p.requires_grad}
    assert flagged == set(want), "requires_grad flags disagree with trainable_parameters"
    if not want:
        return
    work.eval()
    out = work(*case.inputs)
    weights = torch.linspace(-1.0, 1.5, out.numel()).view(out.shape)
    if out.requires_grad:  # not when only unused modules or switched-off adapters train
        (out.float() * weights).sum().backward()
    adapters = adapter_parameters(work)
    siblings = dict(work.named_parameters(remove_duplicate=False))
    active = set(surgery.active_adapters(work))
    for name, p in work.named_parameters():
        if id(p) not in want:
            assert p.grad is None, f"frozen parameter {name} got a gradient"
            continue
        mod = adapters.get(id(p), (None, None, None))[2]
        if not _used(name, case) or (mod is not None and mod.adapter_name not in active):
            continue
        if mod is not None and (not getattr(mod, "active", True) or getattr(mod, "length", 1) == 0):
            continue  # switched off, or a prefix of length 0 (whose encoder makes nothing)
        if p.numel() == 0:
            continue
        assert p.grad is not None, f"no gradient reached trainable parameter {name}"
        if _must_reach(name, p, mod, siblings) and mod is not None:
            assert p.grad.ne(0).any(), f"the gradient of {name} is zero"


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter parameter not merged random values, in place (IA³ vectors near
    one, everything else ``0.1 · N(0, 1)``), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p, mod in adapter_parameters(model).values():
            if p.is_floating_point() and p.numel() and not _merged(model, mod):
                noise = 0.1 * torch.randn(p.shape, generator=gen)
                p.copy_(noise + 1.0 if ".ia3_l." in name else noise)


def _relative(out: torch.Tensor, truth: torch.Tensor) -> float:
    """``max|out - truth| / (1 + max|truth|)``."""
    t = truth.double()
    return ((out.double() - t).abs().max() / (1 + t.abs().max())).item()


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    adapters = {n for n, _, _ in adapter_parameters(model).values()}
    return {n: t for n, t in model.state_dict().items() if n not in adapters}


def check_merge_round_trip(model: nn.Module, case: ModelCase) -> bool:
    """Merge every LoRA and IA³ adapter of a randomised copy, compare, unmerge, compare.

    Returns whether a merge ran (a model with merged adapters already, or none to merge,
    or a documented refusal, is skipped).
    """
    if surgery.merged_adapters(model) or not hasattr(model, "_surgery"):
        return False
    work = copy.deepcopy(model)
    randomize(work)
    kinds = {m.pass_name for _, _, m in adapter_parameters(work).values()
             if getattr(m, "active", True)}
    merges = [p for k, p in (("lora", surgery.MergeLoRAPass()), ("ia3", surgery.MergeIA3Pass()))
              if k in kinds]
    if not merges:
        return False
    ref = outputs(work, case)
    base = _base_state(work)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = surgery.apply_passes(work, merges)
    except surgery.MergeError as exc:  # documented refusals (order, DoRA reading W)
        assert any(type(p).__name__ in str(exc) for p in merges), str(exc)
        return False
    got = outputs(merged, case)
    wide = tuple(t.double() if t.is_floating_point() else t for t in case.inputs)
    with torch.no_grad():  # the unmerged model, in float64
        truth = copy.deepcopy(work).double()(*wide)
    own = _relative(ref, truth)  # how far the model's own rounding takes it
    err = _relative(got, truth)
    assert err <= MERGE_TOLERANCE[case.dtype] + 2 * own, (
        f"merged outputs off by {err:.3g} (relative to the float64 evaluation), the unmerged "
        f"ones by {own:.3g}")
    unmerges = [surgery.UnmergeIA3Pass() if isinstance(p, surgery.MergeIA3Pass)
                else surgery.UnmergeLoRAPass() for p in reversed(merges)]
    back = surgery.apply_passes(merged, unmerges)
    after = _base_state(back)
    assert set(after) == set(base), "unmerge changed the state-dict keys"
    for key, val in base.items():
        assert torch.equal(after[key], val), f"unmerge did not restore {key} bit for bit"
    assert torch.equal(outputs(back, case), ref), "outputs after unmerge differ"
    return True


def check_save_load(model: nn.Module, case: ModelCase) -> bool:
    """Save a randomised copy's adapters, load them onto the base, compare bit for bit.

    Returns whether a round trip ran (models without adapters are skipped)."""
    if not hasattr(model, "_surgery") or not (names_in_model(model) or
                                               model._surgery.trained_modules):
        return False
    work = copy.deepcopy(model)
    randomize(work, seed=1)
    ref = outputs(work, case)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        surgery.save_adapters(work, tmp)
        loaded = surgery.load_adapters(case.model, tmp, example_inputs=case.inputs)
    assert torch.equal(outputs(loaded, case), ref), "outputs after save/load differ"
    return True

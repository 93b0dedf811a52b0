"""Checks run on every tiny transformers architecture of :mod:`surgery.zoo.hf_tiny`.

Each check takes a :class:`Case` and raises on failure (``AssertionError`` with the max
difference where outputs differ, or the library's own error); it returns a short note on
success. The parametrized test (``test_hf_zoo.py``) and the support-table script
(``support_table.py``) run the same functions.

PEFT is the reference: LoRA with PEFT's default targets for the model type, trainable
counts from ``PeftModel.get_nb_trainable_parameters()``, and greedy ``generate`` tokens of a
PEFT model whose ``B`` is not zero (``init_lora_weights=False``), carried over with
:func:`surgery.import_peft` from the directory PEFT saved.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

import surgery
from surgery.errors import SurgeryError, TraceError
from surgery.zoo.hf_tiny import TINY_ARCHITECTURES, build_tiny, tiny_inputs, tiny_labels

# PEFT's LoRA targets for the architectures its default table does not list (taken from
# the attention projections of each model, as a PEFT user would write them). The MoE
# decoders' experts are fused 3-D parameters that ``target_modules`` cannot reach, so
# they get attention targets too; their experts are checked with ``target_parameters``
# (:data:`EXPERT_TARGETS`, :func:`check_lora_experts`).
EXTRA_TARGETS: dict[str, list[str]] = {
    "distilbert": ["q_lin", "v_lin"],
    "albert": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
    "clip": ["q_proj", "v_proj"],
    "swin": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
    "qwen3_moe": ["q_proj", "v_proj"],
}

GENERATING_TASKS = frozenset({"causal-lm", "seq2seq-lm", "image-text-lm"})
"""The tasks of :mod:`surgery.zoo.hf_tiny` whose models have ``generate``."""

GENERATE_TOKENS = 5
RANK = 8
ALPHA = 8


def peft_targets(model_type: str) -> list[str] | str:
    """PEFT's default LoRA ``target_modules`` for ``model_type`` (its own table first): a
    list of names, or a regex string (Gemma 4) that PEFT matches with ``re.fullmatch``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    targets = table.get(model_type, EXTRA_TARGETS.get(model_type))
    if targets is None:
        raise KeyError(f"no LoRA targets known for {model_type!r}; add them to EXTRA_TARGETS")
    return targets if isinstance(targets, str) else list(targets)


def our_pattern(targets: list[str] | str) -> list[str] | str:
    """PEFT's ``target_modules`` in our selection language: names as they are (both match a
    whole name or a dotted suffix), a regex string as ``re:`` (both ``fullmatch``)."""
    return f"re:{targets}" if isinstance(targets, str) else targets


@dataclass
class Case:
    """One architecture: its base model (never changed), example inputs and kind."""

    model_type: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    task: str
    targets: list[str] | str
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        """Whether the model has ``generate`` (causal, sequence-to-sequence and image-text
        LMs)."""
        return self.task in GENERATING_TASKS


def make_case(model_type: str, seed: int = 0) -> Case:
    """The tiny ``model_type`` model with seeded weights and inputs (as
    ``surgery.load_model`` builds them), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny(model_type)
    args, kwargs = tiny_inputs(model_type, torch.Generator().manual_seed(seed))
    return Case(model_type, model, args, kwargs, TINY_ARCHITECTURES[model_type].task,
                peft_targets(model_type))


def logits(model: nn.Module, case: Case) -> torch.Tensor:
    """``model``'s logits on the case's example inputs, without autograd."""
    with torch.no_grad():
        return model(*case.args, **case.kwargs).logits


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``torch.equal``, or an ``AssertionError`` giving the largest difference."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal, max |difference| {diff:.3g}")


def generate(model: nn.Module, case: Case) -> torch.Tensor:
    """Greedy tokens: ``generate(max_new_tokens=5)`` with the KV cache."""
    kwargs = {k: v for k, v in case.kwargs.items() if k != "decoder_input_ids"}
    pad = getattr(model.config, "pad_token_id", None)
    with torch.no_grad():
        return model.generate(*case.args, **kwargs, max_new_tokens=GENERATE_TOKENS,
                              do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=0 if pad is None else pad)


def check_user_model(adapted: nn.Module, case: Case, what: str) -> None:
    """Same class as the base, outputs at init bitwise equal, and a ``labels=`` loss whose
    gradient reaches every trainable (adapter) parameter and no other parameter."""
    assert type(adapted) is type(case.model), (
        f"{what}: class {type(adapted).__name__} != {type(case.model).__name__}")
    assert_bitwise(logits(adapted, case), logits(case.model, case), f"{what}: outputs at init")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable, f"{what}: nothing trains"
    named = {n for n, _ in surgery.named_trainable_parameters(adapted)}
    assert named == trainable, f"{what}: trainable_parameters() != requires_grad set"
    adapted.zero_grad(set_to_none=True)
    loss = adapted(*case.args, **tiny_labels(case.model_type, case.args, case.kwargs)).loss
    assert loss is not None and torch.isfinite(loss), f"{what}: no finite loss"
    loss.backward()
    missing = sorted(n for n, p in adapted.named_parameters() if p.requires_grad and p.grad is None)
    stray = sorted(n for n, p in adapted.named_parameters() if not p.requires_grad
                   and p.grad is not None)
    assert not missing, f"{what}: adapter parameters without a gradient: {missing[:5]}"
    assert not stray, f"{what}: base parameters with a gradient: {stray[:5]}"
    adapted.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in case.model.parameters()), f"{what}: the base got grads"


def _peft_config(case: Case, **extra: Any) -> Any:
    import peft

    return peft.LoraConfig(target_modules=case.targets, r=RANK, lora_alpha=ALPHA, **extra)


def check_lora_targets(case: Case) -> str:
    """``LoRAPass(pattern=<PEFT's targets>)`` without example inputs: the user's model,
    identity at init, gradients on exactly the adapters, PEFT's trainable count."""
    import peft

    adapted = surgery.apply_passes(case.model,
                                   [surgery.LoRAPass(pattern=our_pattern(case.targets))])
    check_user_model(adapted, case, "LoRA on PEFT's targets")
    ours = sum(p.numel() for p in surgery.trainable_parameters(adapted))
    with torch.random.fork_rng(devices=[]):
        theirs = peft.get_peft_model(copy.deepcopy(case.model), _peft_config(case))
    count = theirs.get_nb_trainable_parameters()[0]
    assert ours == count, f"trainable parameters: ours {ours}, PEFT's {count}"
    return f"{ours} trainable"


def peft_pair(case: Case) -> tuple[Any, nn.Module]:
    """PEFT's LoRA model on the case's targets with random non-zero ``B`` (seed 1), and ours
    loaded from the directory PEFT saved (cached on the case)."""
    if "pair" not in case.cache:
        import peft

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            theirs = peft.get_peft_model(copy.deepcopy(case.model),
                                         _peft_config(case, init_lora_weights=False)).eval()
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
                type(theirs), "create_or_update_model_card", lambda *a: None):
            theirs.save_pretrained(tmp)
            ours = surgery.import_peft(case.model, tmp).eval()
        case.cache["pair"] = (theirs, ours)
    return case.cache["pair"]


def check_peft_outputs(case: Case) -> str:
    """Ours and PEFT's on the same adapter weights: logits within ``1e-5 * (1 + max|y|)``
    and, for LMs, equal greedy ``generate`` tokens (with the cache)."""
    theirs, ours = peft_pair(case)
    base, want, got = logits(case.model, case), logits(theirs, case), logits(ours, case)
    assert not torch.equal(want, base), "PEFT's adapter does not change the outputs"
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5 * (1 + want.abs().max().item()), f"logits differ from PEFT's by {diff:.3g}"
    if not case.generates:
        return f"logits within {diff:.1g}"
    tokens, reference = generate(ours, case), generate(theirs, case)
    assert torch.equal(tokens, reference), (
        f"greedy tokens differ from PEFT's: {tokens.tolist()} != {reference.tolist()}")
    return f"logits within {diff:.1g}, {GENERATE_TOKENS} new tokens equal"


def check_merge(case: Case) -> str:
    """Merge is close to the unmerged model, unmerge restores weights and outputs bit for
    bit, ``unload`` equals the merge bit for bit and loads strictly into a fresh model."""
    _, ours = peft_pair(case)
    before = logits(ours, case)
    merged = surgery.apply_passes(ours, [surgery.MergeLoRAPass()])
    out = logits(merged, case)
    diff = (out - before).abs().max().item()
    assert diff <= 1e-5 * (1 + before.abs().max().item()), f"merged output differs by {diff:.3g}"
    back = surgery.apply_passes(merged, [surgery.UnmergeLoRAPass()])
    assert_bitwise(logits(back, case), before, "unmerge: outputs")
    base_params = dict(case.model.named_parameters())
    for name, param in back.named_parameters():
        if name in base_params:
            assert_bitwise(param.detach(), base_params[name].detach(), f"unmerge: {name}")
    plain = surgery.unload(ours)
    assert type(plain) is type(case.model)
    assert_bitwise(logits(plain, case), out, "unload vs merge")
    assert plain.state_dict().keys() == case.model.state_dict().keys(), "unload: keys differ"
    fresh = build_tiny(case.model_type)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert_bitwise(logits(fresh, case), out, "unload: reloaded model")
    return f"merged within {diff:.1g}"


def check_save_load(case: Case) -> str:
    """``save_adapters`` then ``load_adapters`` on the base: outputs bit for bit, adapter
    tensors bit for bit."""
    _, ours = peft_pair(case)
    with tempfile.TemporaryDirectory() as tmp:
        surgery.save_adapters(ours, tmp)
        loaded = surgery.load_adapters(case.model, tmp)
    assert type(loaded) is type(case.model)
    assert_bitwise(logits(loaded, case), logits(ours, case), "load_adapters: outputs")
    mine = dict(loaded.named_parameters())
    for name, param in surgery.named_trainable_parameters(ours):
        assert_bitwise(mine[name].detach(), param.detach(), f"load_adapters: {name}")
    return "bitwise"


EXPERT_TARGETS: dict[str, list[str]] = {
    "mixtral": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "llama4": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
}
"""The fused 3-D expert weights of each MoE architecture, as PEFT's ``target_parameters``."""

EXPERT_TOLERANCE = 1e-5
"""Logits of LoRA on expert weights against PEFT's: ``|ours - PEFT's| <= 1e-5 * (1 +
max|PEFT's|)``. PEFT adds the dense ``ΔW`` to each expert's weight, ours adds the low-rank
term to the routed tokens' product, so the two agree to rounding only (seen: ~2e-7)."""


def check_lora_experts(case: Case) -> str:
    """``LoRAPass(target_parameters=EXPERT_TARGETS[...])`` on the fused expert weights: the
    user's model, identity at init, gradients on exactly the adapters, PEFT's trainable
    count (``LoraConfig(target_parameters=...)``); on PEFT's weights (non-zero ``B``, carried
    with :func:`surgery.import_peft`) logits within :data:`EXPERT_TOLERANCE` of PEFT's and
    the same greedy ``generate`` tokens."""
    import peft

    targets = EXPERT_TARGETS[case.model_type]
    adapted = surgery.apply_passes(case.model, [surgery.LoRAPass(
        target_parameters=targets, rank=RANK, alpha=ALPHA)])
    check_user_model(adapted, case, "LoRA on expert weights")
    ours_count = sum(p.numel() for p in surgery.trainable_parameters(adapted))

    def config(**extra: Any) -> Any:
        return peft.LoraConfig(target_modules=[], target_parameters=targets, r=RANK,
                               lora_alpha=ALPHA, **extra)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        theirs = peft.get_peft_model(copy.deepcopy(case.model),
                                     config(init_lora_weights=False)).eval()
    count = theirs.get_nb_trainable_parameters()[0]
    assert ours_count == count, f"trainable parameters: ours {ours_count}, PEFT's {count}"
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
            type(theirs), "create_or_update_model_card", lambda *a: None):
        theirs.save_pretrained(tmp)
        ours = surgery.import_peft(case.model, tmp).eval()
    base, want, got = logits(case.model, case), logits(theirs, case), logits(ours, case)
    assert not torch.equal(want, base), "PEFT's expert adapter does not change the outputs"
    diff = (got - want).abs().max().item()
    assert diff <= EXPERT_TOLERANCE * (1 + want.abs().max().item()), (
        f"logits differ from PEFT's by {diff:.3g}")
    tokens, reference = generate(ours, case), generate(theirs, case)
    assert torch.equal(tokens, reference), (
        f"greedy tokens differ from PEFT's: {tokens.tolist()} != {reference.tolist()}")
    return f"{ours_count} trainable, logits within {diff:.1g}, {GENERATE_TOKENS} tokens equal"


DEFAULT_PASSES: dict[str, Callable[[], Any]] = {
    "lora_default": lambda: surgery.LoRAPass(),
    "ia3": lambda: surgery.IA3Pass(),
    "adapters": lambda: surgery.SerialAdapterPass(),
    "prefix": lambda: surgery.PrefixPass(length=4, gate="zero"),
}
"""The passes that select by role (their defaults), by column name."""


def check_default_pass(case: Case, column: str) -> str:
    """``DEFAULT_PASSES[column]`` with the example inputs: the user's model, identity at
    init, gradients on exactly the adapters; LMs ``generate`` the base model's tokens."""
    adapted = surgery.apply_passes(case.model, [DEFAULT_PASSES[column]()], case.args,
                                   case.kwargs)
    check_user_model(adapted, case, column)
    if case.generates:
        assert torch.equal(generate(adapted, case), generate(case.model, case)), (
            f"{column}: generate at init differs from the base model's")
    return f"{sum(p.numel() for p in surgery.trainable_parameters(adapted))} trainable"


def without_inputs(case: Case, column: str) -> bool:
    """Whether ``DEFAULT_PASSES[column]`` applies without example inputs. A refusal must be
    a :class:`TraceError` that names ``example_inputs=`` as the way out."""
    try:
        surgery.apply_passes(case.model, [DEFAULT_PASSES[column]()])
    except TraceError as e:
        assert "example_inputs" in str(e), f"{column}: TraceError without the way out: {e}"
        return False
    return True


CHECKS: dict[str, Callable[[Case], str]] = {
    "lora": check_lora_targets,
    "peft_outputs": check_peft_outputs,
    "merge": check_merge,
    "save_load": check_save_load,
    **{name: (lambda case, name=name: check_default_pass(case, name)) for name in DEFAULT_PASSES},
}
"""Every check, by name; the test parametrizes over these."""


@dataclass
class Outcome:
    """What one check gave: ``ok`` and a note, or the error's type and first line."""

    ok: bool
    note: str
    error_type: type[BaseException] | None = None


MOE_CHECKS: dict[str, Callable[[Case], str]] = {"lora_experts": check_lora_experts}
"""The checks of the mixture-of-experts architectures only."""


def run_check(name: str, case: Case) -> Outcome:
    """Run ``CHECKS[name]`` (or ``MOE_CHECKS[name]``) and record the result instead of
    raising."""
    try:
        return Outcome(True, {**CHECKS, **MOE_CHECKS}[name](case))
    except (SurgeryError, AssertionError, Exception) as e:  # noqa: BLE001 - a table cell
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Outcome(False, f"{type(e).__name__}: {first}", type(e))

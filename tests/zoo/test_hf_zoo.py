"""The transformers zoo: every architecture of :mod:`surgery.zoo.hf_tiny` through every check
of :mod:`checks` (LoRA on PEFT's targets, the default passes, PEFT parity with ``generate``,
merge / unmerge / unload, save / load), and the mixture-of-experts ones through LoRA on their
fused expert weights (``target_parameters``) against PEFT's.

A check that does not work on an architecture is listed in
:data:`known_failures.KNOWN_FAILURES` with the
error it raises and why; the test then asserts that error, so it fails as soon as the case
starts working (move it out of the table then) or fails differently. Nothing is skipped.
By default a sample of architectures runs (``tests/zoo/conftest.py``); ``--zoo=all`` or
``-m zoo`` runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from surgery.errors import NoMatchError
from surgery.zoo import available_models, load_model
from surgery.zoo.hf_tiny import (
    TINY_ARCHITECTURES,
    build_tiny,
    tiny_architectures,
    tiny_inputs,
)

pytest.importorskip("transformers")
pytest.importorskip("peft")

from zoo.checks import (  # noqa: E402
    CHECKS,
    DEFAULT_PASSES,
    EXPERT_TARGETS,
    MOE_CHECKS,
    check_lora_experts,
    without_inputs,
)
from zoo.known_failures import KNOWN_FAILURES  # noqa: E402

pytestmark = [
    pytest.mark.zoo,
    # the image classifiers' heads stay frozen, and apply_passes says so; expected here
    pytest.mark.filterwarnings("ignore:The task head classifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]


ARCHITECTURES = tiny_architectures()
MOE_ARCHITECTURES = [t for t in ARCHITECTURES if TINY_ARCHITECTURES[t].moe]


def test_known_failures_name_real_cases() -> None:
    for model_type, check in KNOWN_FAILURES:
        assert model_type in TINY_ARCHITECTURES, model_type
        assert check in CHECKS or (check in MOE_CHECKS and model_type in MOE_ARCHITECTURES), (
            model_type, check)
    assert set(EXPERT_TARGETS) == set(MOE_ARCHITECTURES)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_check(model_type: str, check: str, case_for: Callable[[str], Any]) -> None:
    case = case_for(model_type)
    known = KNOWN_FAILURES.get((model_type, check))
    if known is None:
        CHECKS[check](case)
        return
    with pytest.raises(known.error, match=known.match):
        CHECKS[check](case)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_lora_experts(model_type: str, case_for: Callable[[str], Any]) -> None:
    """LoRA on the fused expert weights (``target_parameters``) against PEFT's."""
    case = case_for(model_type)
    known = KNOWN_FAILURES.get((model_type, "lora_experts"))
    if known is None:
        check_lora_experts(case)
        return
    with pytest.raises(known.error, match=known.match):
        check_lora_experts(case)


@pytest.mark.zoo_all
@pytest.mark.parametrize("column", list(DEFAULT_PASSES))
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_default_pass_without_inputs(model_type: str, column: str,
                                     case_for: Callable[[str], Any]) -> None:
    """Without example inputs a default pass applies, or refuses with a TraceError that
    names ``example_inputs=`` (checked inside :func:`checks.without_inputs`)."""
    case = case_for(model_type)
    known = KNOWN_FAILURES.get((model_type, column))
    if known is not None:
        with pytest.raises(known.error, match=known.match):
            without_inputs(case, column)
        return
    assert without_inputs(case, column) == ((model_type, column) not in NEEDS_INPUTS)


NEEDS_INPUTS: set[tuple[str, str]] = set()
"""(model_type, default pass) that refuse to run without example inputs."""


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_registered_and_seeded(model_type: str) -> None:
    """``load_model("hf:<type>")`` builds it (the four hand-written specs keep their own
    models); the tiny builder is deterministic under a seed and takes its example inputs."""
    assert f"hf:{model_type}" in available_models()
    torch.manual_seed(5)
    a = build_tiny(model_type)
    torch.manual_seed(5)
    b = build_tiny(model_type)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    args, kwargs = tiny_inputs(model_type, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = a(*args, **kwargs).logits
    task = TINY_ARCHITECTURES[model_type].task
    want = {"causal-lm": (2, 16, 128), "masked-lm": (2, 16, 128), "seq2seq-lm": (2, 8, 128),
            "image-classification": (2, 2), "image-text-lm": (2, 16, 128)}[task]
    assert tuple(out.shape) == want
    assert torch.isfinite(out).all()
    if model_type not in {"gpt2", "llama", "bert", "vit"}:
        spec = load_model(f"hf:{model_type}")
        assert type(spec.model) is type(a)
        assert spec.description


def test_unknown_architecture_names_near_matches() -> None:
    with pytest.raises(NoMatchError, match=r"'mixtrall'.*nearest known: mixtral"):
        build_tiny("mixtrall")

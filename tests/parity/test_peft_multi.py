"""fx-surgery against HF PEFT with two adapters: both active, mixed batches, weighted
combination, on PEFT's two-adapter cases (:data:`parity.peft_cases.MULTI_ACTIVE_CASES`,
:data:`parity.peft_cases.MIXED_CASES`), the same weights in both models.

Both active: PEFT's ``base_model.set_adapter([a, b])`` against
``surgery.set_active(model, [a, b])``. Mixed batches: PEFT's ``adapter_names=`` forward
argument (``"__base__"`` for no adapter) against :func:`surgery.route_samples`. Weighted
combination: PEFT's ``add_weighted_adapter`` then ``set_adapter`` against
:func:`surgery.combine_adapters`.
"""

from __future__ import annotations

import copy
import warnings
from functools import cache

import pytest
import torch

import surgery
from parity.peft_cases import (
    COMBINE_METHODS,
    MIXED_CASES,
    MULTI_ACTIVE_CASES,
    MULTI_UNSUPPORTED,
    MultiCase,
    supported,
)
from parity.peft_pairs import (
    Pair,
    activation_scale,
    assert_close,
    pair,
    run,
    run_seeded,
    trainable,
)

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ACTIVE = supported(MULTI_ACTIVE_CASES, MULTI_UNSUPPORTED)
MIXED = supported(MIXED_CASES, MULTI_UNSUPPORTED)
NAMES = ("adapter0", "adapter1")


def _inputs(model_id: str) -> torch.Tensor | None:
    """PEFT's mixed-batch input for the ``Conv2d`` case (6 images); others: the usual."""
    return torch.arange(270).view(6, 5, 3, 3) if model_id == "Conv2d" else None


@cache
def _pair(case_id: str) -> Pair:
    """The shared pair of a two-adapter case, ``adapter0`` active."""
    _, kind, model_id, first, second = next(c for c in MULTI_ACTIVE_CASES + MIXED_CASES
                                            if c[0] == case_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = pair(model_id, kind, dict(zip(NAMES, (first, second))))
    x = _inputs(model_id)
    return made if x is None else Pair(made.theirs, made.ours, made.base, x)


def _share_a_layer(case_id: str) -> bool:
    """Both adapters of the case sit on some layer."""
    _, _, _, first, second = next(c for c in MULTI_ACTIVE_CASES + MIXED_CASES if c[0] == case_id)
    return bool(set(first["target_modules"]) & set(second["target_modules"]))


def _ids(cases: list[MultiCase]) -> list[str]:
    return [c[0] for c in cases]


def test_listing_is_complete() -> None:
    ids = _ids(MULTI_ACTIVE_CASES) + _ids(MIXED_CASES)
    assert len(ids) == len(set(ids)) and set(MULTI_UNSUPPORTED) <= set(ids)
    assert sorted(_ids(ACTIVE) + _ids(MIXED) + list(MULTI_UNSUPPORTED)) == sorted(ids)
    assert all(reason.startswith("needs ") for reason in MULTI_UNSUPPORTED.values())
    assert (len(ACTIVE), len(MIXED), len(MULTI_UNSUPPORTED)) == (4, 4, 9)


@pytest.mark.parametrize("case_id", _ids(ACTIVE) + _ids(MIXED))
def test_both_adapters_active(case_id: str) -> None:
    p = _pair(case_id)
    theirs = copy.deepcopy(p.theirs)
    one = run(theirs, p.x)
    assert_close(run(p.ours, p.x), one, exact=True)
    theirs.base_model.set_adapter(list(NAMES))
    surgery.set_active(p.ours, list(NAMES))
    try:
        both = run(theirs, p.x)
        assert (both - one).abs().max() > 1e-3
        # bitwise where the adapters sit on different layers; on one layer the two updates
        # are summed in another order (see test_two_adapters_on_one_layer_in_train_mode)
        assert_close(run(p.ours, p.x), both, not _share_a_layer(case_id),
                     activation_scale(theirs, p.x))
        peft_side, ours = trainable(theirs, p.ours)
        assert peft_side == ours and any("adapter1" in n.split(".") for n in ours)
    finally:
        surgery.set_active(p.ours, NAMES[0])


@pytest.mark.parametrize("case_id", _ids(MIXED))
def test_mixed_batch(case_id: str) -> None:
    p = _pair(case_id)
    batch = p.x.shape[0]
    chosen = ["__base__", *NAMES] * batch
    names = chosen[:batch]
    reference = run(p.theirs, p.x, adapter_names=names)
    routes = {name: torch.tensor([n == name for n in names]) for name in NAMES}
    with surgery.route_samples(p.ours, routes):
        mixed = run(p.ours, p.x)
    # PEFT runs each adapter on its rows only, we on the whole batch then select: the
    # matrix products round differently
    assert_close(mixed, reference, False, activation_scale(p.theirs, p.x))
    # and each row is what that row's adapter alone gives
    with surgery.disable_adapters(p.ours):
        alone = {"__base__": run(p.ours, p.x)}
    for name in NAMES:
        surgery.set_active(p.ours, name)
        alone[name] = run(p.ours, p.x)
    surgery.set_active(p.ours, NAMES[0])
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], alone[name][row]), (row, name)


COMBINE = [("LoRA Same", "linear"), ("LoRA Same", "cat"), ("LoRA mixed adapter", "cat"),
           ("LoRA mixed adapter with conv2d", "cat")]


@pytest.mark.parametrize(("case_id", "method"), COMBINE)
def test_weighted_combination(case_id: str, method: str) -> None:
    p = _pair(case_id)
    weights = {"adapter0": 0.7, "adapter1": -0.3}
    theirs = copy.deepcopy(p.theirs)
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "mix",
                                combination_type=method)
    theirs.set_adapter("mix")
    mixed = surgery.combine_adapters(p.ours, weights, method=method, name="mix")
    assert surgery.active_adapters(mixed) == ["mix"]
    reference = run(theirs, p.x)
    assert (reference - run(p.theirs, p.x)).abs().max() > 1e-3
    assert_close(run(mixed, p.x), reference, False, activation_scale(theirs, p.x))
    for name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            ours = mixed.get_submodule(name)
            assert torch.equal(ours.lora_A["mix"].weight, module.lora_A["mix"].weight)
            assert torch.equal(ours.lora_B["mix"].weight, module.lora_B["mix"].weight)


def test_combination_methods_listed() -> None:
    """Every method PEFT has either runs above or is refused here by name."""
    assert {m for _, m in COMBINE} == {m for m, ours in COMBINE_METHODS.items() if ours}
    for method in (m for m, ours in COMBINE_METHODS.items() if not ours):
        with pytest.raises(surgery.ConfigError, match="method"):
            surgery.combine_adapters(_pair("LoRA Same").ours, {"adapter0": 1.0, "adapter1": 1.0},
                                     method=method, name="mix")


def test_two_adapters_on_one_layer_in_train_mode() -> None:
    """Two LoRA adapters on one layer add up in the order they were added (W x + b + Δ0 +
    Δ1), as PEFT's, so their dropout masks are drawn in PEFT's order too."""
    config = {"target_modules": ["lin0"], "lora_dropout": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = pair("MLP", "lora", {"adapter0": config, "adapter1": dict(config, r=16)})
    p.theirs.base_model.set_adapter(list(NAMES))
    surgery.set_active(p.ours, list(NAMES))
    assert torch.equal(run(p.ours, p.x), run(p.theirs, p.x))
    assert torch.equal(run_seeded(p.ours, p.x), run_seeded(p.theirs, p.x))

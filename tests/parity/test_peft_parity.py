"""fx-surgery against HF PEFT on the LoRA and IA³ cases of PEFT's custom-model tests.

Every case of :mod:`parity.peft_cases` either runs here or is listed with the feature it
needs. A case runs on two models holding the same weights (:func:`parity.peft_pairs.pair`:
PEFT's model with random adapter values, saved and loaded with :func:`surgery.import_peft`)
and checks: trainable parameter names and counts (PEFT's names less ``base_model.model.``,
``.base_layer`` and ``.modules_to_save.<adapter>``, nothing else renamed; IA³ vectors also by
shape and value); outputs in eval and in training mode
(dropout drawn from the same seed); merge against PEFT's merge, unmerge back bit for bit;
disabled adapters against PEFT's ``disable_adapter()``. Outputs are bitwise equal where
both compute the same float32 operations in the same order, which the measurements show for
every case except DoRA on linear and Conv1D layers (PEFT normalises the weight in another
order) and merges of 2-D and 3-D convolutions (the update is folded by a differently ordered
contraction). Those agree within ``1e-6 · (1 + s)``, ``s`` the largest activation inside the
model (:func:`parity.peft_pairs.activation_scale`; the models end in a log-softmax, which
hides the scale at which rounding happens).

DoRA on grouped convolutions is listed as unsupported: PEFT's norm there reshapes B·A into
the grouped weight's shape, which is not the layer's update, and the import refuses it.
"""

from __future__ import annotations

import copy
import warnings
from functools import cache

import pytest
import torch

import surgery
from parity.peft_cases import (
    IA3_CASES,
    LORA_CASES,
    PEFT_COUNTS,
    UNSUPPORTED,
    case_kind,
    our_passes,
    supported,
)
from parity.peft_models import MODELS, build
from parity.peft_pairs import (
    Pair,
    activation_scale,
    assert_close,
    pair,
    run,
    run_seeded,
    trainable,
)
from passes.merge import MergeIA3Pass, MergeLoRAPass, UnmergeIA3Pass, UnmergeLoRAPass

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL_CASES = LORA_CASES + IA3_CASES
RUN = supported(ALL_CASES, UNSUPPORTED)
IDS = [c[0] for c in RUN]

NOT_BITWISE = {cid for cid, model_id, cfg in RUN
               if cfg.get("use_dora") and model_id in ("MLP", "EmbConv1D")}
"""Cases whose outputs match PEFT's to rounding only (DoRA on linear and Conv1D layers)."""
MERGE_NOT_BITWISE = {cid for cid, model_id, _ in RUN
                     if case_kind(cid) == "lora" and model_id in ("Conv2d", "Conv3d")} | NOT_BITWISE
"""Merges that match PEFT's to rounding only: those of NOT_BITWISE, and LoRA / DoRA on 2-D
and 3-D convolutions (the update ``B A`` is contracted in another order than PEFT's)."""
MERGE_REFUSED = {cid for cid, model_id, _ in RUN if model_id.startswith("Conv2dGroups")}
"""LoRA on a grouped convolution: the update ``B A`` reads every input channel, which a
grouped weight cannot hold; we refuse the merge (PEFT warns that merging is not supported)."""

@cache
def _pair(case_id: str) -> Pair:
    """The shared pair of a case (tests must leave it as they found it)."""
    _, model_id, config = next(c for c in RUN if c[0] == case_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pair(model_id, case_kind(case_id), {"default": config})


def test_case_listing_is_complete() -> None:
    ids = [c[0] for c in ALL_CASES]
    assert len(ids) == len(set(ids))
    assert len(LORA_CASES) == PEFT_COUNTS["lora"] and len(IA3_CASES) == PEFT_COUNTS["ia3"]
    assert set(UNSUPPORTED) <= set(ids), sorted(set(UNSUPPORTED) - set(ids))
    assert all(reason.startswith("needs ") for reason in UNSUPPORTED.values())
    assert sorted(IDS + list(UNSUPPORTED)) == sorted(ids)
    assert len(IDS) == 47 and len(UNSUPPORTED) == 21


@pytest.mark.parametrize("case_id", IDS)
def test_trainable_names_and_counts(case_id: str) -> None:
    p = _pair(case_id)
    theirs, ours = trainable(p.theirs, p.ours)
    assert theirs == ours
    assert sum(theirs.values()) == sum(ours.values()) > 0


@pytest.mark.parametrize("case_id", [c for c in IDS if case_kind(c) == "ia3"])
def test_ia3_parameters_are_peft_s_by_name_shape_and_value(case_id: str) -> None:
    """An IA³ vector is ``<layer>.ia3_l.<adapter>`` in both models, PEFT's name without
    ``base_model.model.`` and nothing renamed, of the same shape ((out, 1), (1, in),
    (1, C, 1, 1), ...) and the same values; ours are trainable as PEFT's are."""
    p = _pair(case_id)
    theirs = {n.removeprefix("base_model.model."): q for n, q in p.theirs.named_parameters()
              if ".ia3_l." in n}
    ours = {n: q for n, q in p.ours.named_parameters() if ".ia3_l." in n}
    assert theirs and sorted(theirs) == sorted(ours)
    assert all(n.endswith(".ia3_l.default") for n in ours)
    for name, param in ours.items():
        assert param.shape == theirs[name].shape, name
        assert torch.equal(param, theirs[name])
        assert param.requires_grad == theirs[name].requires_grad


@pytest.mark.parametrize("case_id", IDS)
def test_outputs_in_eval_and_train_mode(case_id: str) -> None:
    p = _pair(case_id)
    exact = case_id not in NOT_BITWISE
    scale = activation_scale(p.theirs, p.x)
    reference = run(p.theirs, p.x)
    assert (reference - run(p.base, p.x)).abs().max() > 1e-3  # the adapter changes the output
    assert_close(run(p.ours, p.x), reference, exact, scale)
    assert_close(run_seeded(p.ours, p.x), run_seeded(p.theirs, p.x), exact, scale)


@pytest.mark.parametrize("case_id", IDS)
def test_merge_then_unmerge(case_id: str) -> None:
    p = _pair(case_id)
    lora = case_kind(case_id) == "lora"
    merge, unmerge = (MergeLoRAPass, UnmergeLoRAPass) if lora else (MergeIA3Pass, UnmergeIA3Pass)
    if case_id in MERGE_REFUSED:
        with pytest.raises(surgery.MergeError, match="groups"):
            surgery.apply_passes(p.ours, [merge()])
        return
    before = run(p.ours, p.x)
    weights = {n: t.clone() for n, t in p.ours.state_dict().items()}
    merged = surgery.apply_passes(p.ours, [merge()])
    theirs = copy.deepcopy(p.theirs)
    theirs.merge_adapter()
    assert_close(run(merged, p.x), run(theirs, p.x), case_id not in MERGE_NOT_BITWISE,
                 activation_scale(theirs, p.x))
    back = surgery.apply_passes(merged, [unmerge()])
    assert torch.equal(run(back, p.x), before)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


@pytest.mark.parametrize("case_id", IDS)
def test_disabled_adapters(case_id: str) -> None:
    p = _pair(case_id)
    adapted = run(p.ours, p.x)
    with p.theirs.disable_adapter():
        reference = run(p.theirs, p.x)
    assert torch.equal(reference, run(p.base, p.x))
    with surgery.disable_adapters(p.ours):
        assert torch.equal(run(p.ours, p.x), reference)
    assert torch.equal(run(p.ours, p.x), adapted)  # the adapters are back after the block


@pytest.mark.parametrize("case_id", IDS)
def test_translated_passes_build_the_same_parameters(case_id: str) -> None:
    """The passes our translation gives for a config, applied directly, create the
    parameters (names, shapes, trainable flags) that import_peft's model holds."""
    _, model_id, config = next(c for c in RUN if c[0] == case_id)
    p = _pair(case_id)
    direct = surgery.apply_passes(build(model_id), our_passes(build(model_id), case_kind(case_id),
                                                              config))
    shapes = {n: (t.shape, t.requires_grad) for n, t in direct.named_parameters()}
    assert shapes == {n: (t.shape, t.requires_grad) for n, t in p.ours.named_parameters()}


REFUSAL_CHECKED = [cid for cid, model_id, cfg in ALL_CASES if cid in UNSUPPORTED
                   and model_id in MODELS and not any(isinstance(v, str) and "Config(" in v
                                                      for v in cfg.values())]
"""Unsupported cases PEFT can build here (a rebuilt model, no config objects): our import
must refuse them, naming what is missing, rather than compute something else."""


@pytest.mark.parametrize("case_id", REFUSAL_CHECKED)
def test_unsupported_cases_are_refused(case_id: str) -> None:
    _, model_id, config = next(c for c in ALL_CASES if c[0] == case_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(surgery.CheckpointError) as caught:
            pair(model_id, case_kind(case_id), {"default": config})
    feature = UNSUPPORTED[case_id]
    named = {"DoRA": "DoRA", "lora_b": "lora_bias", "token": "trainable_token_indices",
             "MiCA": "mica", "parameters": "target_parameters"}
    assert any(key in feature and word in str(caught.value) for key, word in named.items()), \
        str(caught.value)


def test_refusal_check_covers_the_buildable_cases() -> None:
    assert len(REFUSAL_CHECKED) == 10

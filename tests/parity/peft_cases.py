"""The LoRA and IA³ cases of PEFT's custom-model tests, as data.

Taken from huggingface/peft ``tests/test_custom_models.py`` (commit 5d602fd, PEFT 0.21):
``TEST_CASES`` (every row with ``LoraConfig`` or ``IA3Config``), the LoRA and IA³ rows of
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` and the LoRA cases of ``TestMixedAdapterBatches``.
Each case is ``(case id, model id, config dict)``; a config dict goes to ``LoraConfig`` /
``IA3Config`` as keyword arguments. PEFT's list gives the id
``"transformers Conv1D 1 IA3"`` to two cases; the second (with ``modules_to_save``) is
``"transformers Conv1D 1 IA3 #2"`` here.

Settings PEFT configures with objects (KaSA, VeLoRA, MonteCLoRA, BD-LoRA) are written as
strings: those cases are never built here, only listed in ``UNSUPPORTED`` with the feature
they need. Our side of a case is what :func:`surgery.import_peft` builds from the config
(:func:`our_passes` shows the passes).
"""

from __future__ import annotations

from typing import Any

from torch import nn

Case = tuple[str, str, dict[str, Any]]

LORA_CASES: list[Case] = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4,
                                   "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"],
                                             "use_dora": True}),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"],
                                             "kasa_config": "KasaConfig()", "r": 4}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"],
                                             "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True,
                                             "lora_alpha": 32}),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", {
        "target_modules": ["lin0"],
        "velora_config": "VeloraConfig(num_groups=2, init_type='random')"}),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", {
        "target_modules": ["lin0", "lin1"],
        "velora_config": "VeloraConfig(num_groups=2, init_type='batch_average')"}),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", {
        "target_modules": ["lin0"],
        "velora_config": "VeloraConfig(num_groups=2, init_type='batch_average_once')"}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb",
                                                                                "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", {
        "target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"],
                                           "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"],
                                                      "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"],
                                                        "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"],
                                           "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"],
                                                    "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"],
                                                  "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"],
                                                  "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"],
                                              "target_parameters": ["lin1.weight"]}),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", {
        "target_modules": ["lin0"], "monteclora_config": "MontecloraConfig(num_samples=2)"}),
    ("BD-LoRA A only", "MLP", {
        "target_modules": ["lin0", "lin1"],
        "use_bdlora": "BdLoraConfig(target_modules_bd_a=['lin0'], match_strict=False)"}),
    ("BD-LoRA B only", "MLP", {
        "target_modules": ["lin0", "lin1"],
        "use_bdlora": "BdLoraConfig(target_modules_bd_b=['lin1'], nblocks=2, "
                      "match_strict=False)"}),
    ("BD-LoRA both A and B", "MLP", {
        "target_modules": ["lin0", "lin1"],
        "use_bdlora": "BdLoraConfig(target_modules_bd_a=['lin0'], target_modules_bd_b=['lin1'], "
                      "nblocks=2)"}),
]

IA3_CASES: list[Case] = [
    ("Vanilla MLP 1 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": []}),
    ("Vanilla MLP 2 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    ("Vanilla MLP 3 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": []}),
    ("Vanilla MLP 4 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    ("Vanilla MLP 5 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 6 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    ("Vanilla MLP 7 IA3", "MLP", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 8 IA3", "MLP", {"target_modules": ["lin0", "lin1"],
                                  "feedforward_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 9 IA3", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"],
                                  "feedforward_modules": ["lin0"]}),
    ("transformers Conv1D 1 IA3", "EmbConv1D", {"target_modules": ["conv1d"],
                                                "feedforward_modules": ["conv1d"]}),
    ("transformers Conv1D 2 IA3", "EmbConv1D", {"target_modules": ["conv1d", "lin0"],
                                                "feedforward_modules": ["conv1d", "lin0"]}),
    ("transformers Conv1D 1 IA3 #2", "EmbConv1D", {"target_modules": ["conv1d"],
                                                   "feedforward_modules": ["conv1d"],
                                                   "modules_to_save": ["lin0"]}),
    ("Conv2d 1 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    ("Conv2d 4 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"],
                                "feedforward_modules": ["conv2d"]}),
    ("Conv2d 5 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"],
                                "feedforward_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    ("Conv3d 4 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"],
                                "feedforward_modules": ["conv3d"]}),
    ("Conv3d 5 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"],
                                "feedforward_modules": ["conv3d", "lin0"]}),
]

_DORA_EMB = "needs DoRA on embeddings (use_dora on nn.Embedding)"
_LORA_BIAS = "needs a bias on lora_B (lora_bias=True)"
_DORA_GROUPED = ("needs PEFT's DoRA norm on a grouped convolution (B·A reshaped into the grouped "
                 "weight's shape, not that layer's update): fx-surgery normalises the update "
                 "itself, and its PEFT import and export refuse grouped DoRA")

UNSUPPORTED: dict[str, str] = {
    "Vanilla MLP 1 LoRA with KaSA": "needs KaSA (kasa_config)",
    "Vanilla MLP 1 LoRA with MiCA": "needs MiCA (init_lora_weights='mica')",
    "Vanilla MLP 10 LoRA with VeLoRA random": "needs VeLoRA (velora_config)",
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": "needs VeLoRA (velora_config)",
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": "needs VeLoRA (velora_config)",
    "Embedding + transformers Conv1D 2 DoRA": _DORA_EMB,
    "Embedding + transformers Conv1D 3 DoRA": _DORA_EMB,
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens":
        "needs trainable token indices (trainable_token_indices)",
    "Vanilla MLP 1 LoRA with lora_b bias": _LORA_BIAS,
    "Conv2d 1 LoRA with lora_b bias": _LORA_BIAS,
    "Conv3d 1 LoRA with lora_b bias": _LORA_BIAS,
    "MHA 1 LoRA": "needs LoRA on nn.MultiheadAttention",
    "MHA 2 LoRA": "needs LoRA on nn.MultiheadAttention",
    "MLP 1 using nn.Parameter LoRA": "needs LoRA on parameters (target_parameters)",
    "MLP 2 using nn.Parameter LoRA": "needs LoRA on parameters (target_parameters)",
    "Vanilla MLP 1 LoRA with Monteclora": "needs MonteCLoRA (monteclora_config)",
    "BD-LoRA A only": "needs block-diagonal LoRA (use_bdlora)",
    "BD-LoRA B only": "needs block-diagonal LoRA (use_bdlora)",
    "BD-LoRA both A and B": "needs block-diagonal LoRA (use_bdlora)",
    "Conv2d Groups LoRA with DoRA": _DORA_GROUPED,
    "Conv2d Groups2 LoRA with DoRA": _DORA_GROUPED,
}
"""Case id -> the feature the case needs and fx-surgery does not have."""

PEFT_COUNTS = {"lora": 46, "ia3": 22}
"""How many LoRA and IA³ rows ``TEST_CASES`` holds at the commit named above."""

# --------------------------------------------------------------------- two adapters

MultiCase = tuple[str, str, str, dict[str, Any], dict[str, Any]]

MULTI_ACTIVE_CASES: list[MultiCase] = [
    ("LoRA Same", "lora", "MLP", {"target_modules": ["lin0"], "init_lora_weights": False},
     {"target_modules": ["lin0"], "init_lora_weights": False}),
    ("LoRA Different", "lora", "MLP", {"target_modules": ["lin0"], "init_lora_weights": False},
     {"target_modules": ["lin1"], "init_lora_weights": False}),
    ("LoRA + trainable tokens Same", "lora", "MLP", {}, {}),
    ("LoRA + trainable tokens Different", "lora", "MLP", {}, {}),
    ("LoRA targeting nn.Parameter Same", "lora", "MLP", {}, {}),
    ("LoRA targeting nn.Parameter Different", "lora", "MLP", {}, {}),
    ("IA3 Same", "ia3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"],
                                "init_ia3_weights": False},
     {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}),
    ("IA3 Different", "ia3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"],
                                     "init_ia3_weights": False},
     {"target_modules": ["lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}),
]
"""PEFT's two-adapter cases (the model is ``MLP`` there except with trainable tokens; the
config dicts of unsupported cases are left empty)."""

_LORA_OFF = {"init_lora_weights": False}
MIXED_CASES: list[MultiCase] = [
    ("LoRA mixed adapter", "lora", "MLP", {"target_modules": ["lin0"], **_LORA_OFF},
     {"target_modules": ["lin0"], "r": 16, **_LORA_OFF}),
    ("LoRA mixed adapter with different target layers", "lora", "MLP",
     {"target_modules": ["lin0"], **_LORA_OFF}, {"target_modules": ["lin1"], **_LORA_OFF}),
    ("LoRA mixed adapter with modules to save", "lora", "MLP",
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **_LORA_OFF},
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **_LORA_OFF}),
    ("LoRA mixed adapter with unsupported layer", "lora", "MLPWithGRU",
     {"target_modules": ["lin0"], "modules_to_save": ["gru"], **_LORA_OFF},
     {"target_modules": ["lin0"], "modules_to_save": ["gru"], **_LORA_OFF}),
    ("LoRA mixed adapter with overlapping layers", "lora", "MLP",
     {"target_modules": ["lin0"], **_LORA_OFF}, {"target_modules": ["lin0", "lin1"], **_LORA_OFF}),
    ("LoRA mixed adapter with conv1d", "lora", "EmbConv1D",
     {"target_modules": ["emb", "conv1d"], **_LORA_OFF},
     {"target_modules": ["emb", "conv1d"], "r": 16, **_LORA_OFF}),
    ("LoRA mixed adapter with conv1d and emb and modules to save", "lora", "EmbConv1D",
     {"target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"], **_LORA_OFF},
     {"target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"], **_LORA_OFF}),
    ("LoRA mixed adapter with conv2d", "lora", "Conv2d",
     {"target_modules": ["conv2d"], **_LORA_OFF},
     {"target_modules": ["conv2d"], "r": 16, **_LORA_OFF}),
    ("LoRA mixed adapter with mha", "lora", "MHA", {"target_modules": ["mha"], **_LORA_OFF},
     {"target_modules": ["mha"], "r": 16, **_LORA_OFF}),
]
"""The LoRA cases of PEFT's mixed-batch tests (``adapter_names=`` forward argument); the
input of the ``Conv2d`` case is ``arange(270).view(6, 5, 3, 3)``, the others' the usual."""

_PER_ADAPTER_SAVE = ("needs one modules_to_save copy per adapter (TrainModulePass trains the "
                     "module itself, shared by every adapter)")
MULTI_UNSUPPORTED: dict[str, str] = {
    "LoRA + trainable tokens Same": "needs trainable token indices (trainable_token_indices)",
    "LoRA + trainable tokens Different": "needs trainable token indices (trainable_token_indices)",
    "LoRA targeting nn.Parameter Same": "needs LoRA on parameters (target_parameters)",
    "LoRA targeting nn.Parameter Different": "needs LoRA on parameters (target_parameters)",
    "LoRA mixed adapter with modules to save": _PER_ADAPTER_SAVE,
    "LoRA mixed adapter with unsupported layer": _PER_ADAPTER_SAVE + " (PEFT refuses the "
                                                 "mixed batch with a GRU to save)",
    "LoRA mixed adapter with conv1d": "needs two LoRA adapters on one nn.Embedding",
    "LoRA mixed adapter with conv1d and emb and modules to save":
        "needs two LoRA adapters on one nn.Embedding; " + _PER_ADAPTER_SAVE,
    "LoRA mixed adapter with mha": "needs LoRA on nn.MultiheadAttention",
}

COMBINE_METHODS = {"linear": True, "cat": True, "svd": False}
"""PEFT's ``add_weighted_adapter`` combination types for LoRA and whether
:func:`surgery.combine_adapters` has them (``svd``: needs an SVD combination method)."""


def case_kind(case_id: str) -> str:
    """``"lora"`` or ``"ia3"``: the list ``case_id`` is in."""
    return "lora" if case_id in {c[0] for c in LORA_CASES} else "ia3"


def supported(cases: list[Case] | list[MultiCase], unsupported: dict[str, str]) -> list:
    """The cases not listed in ``unsupported``, in order."""
    return [c for c in cases if c[0] not in unsupported]


def our_passes(model: nn.Module, kind: str, config: dict[str, Any]) -> list:
    """Our passes for a case: PEFT's settings translated by the same code
    :func:`surgery.import_peft` uses (:mod:`surgery.checkpoint.peft_targets`)."""
    from surgery.checkpoint.peft_config import parse_peft_config
    from surgery.checkpoint.peft_import import _passes
    from surgery.checkpoint.peft_targets import resolve_peft_targets

    data = {"peft_type": kind.upper(), **config}
    settings = parse_peft_config(data, "parity")
    targets = resolve_peft_targets(model, settings, "default", "parity")
    return _passes(settings, targets, "lora" if kind == "lora" else "ia3", "default")

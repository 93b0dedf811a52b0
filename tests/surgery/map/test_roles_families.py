"""Default roles across transformers families select what PEFT's default target mappings
select (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` and the IA³ target and
feed-forward mappings), compared module by module with what ``get_peft_model`` adapts."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from surgery import IA3Pass, LoRAPass, apply_passes

from hf_families import BUILDERS, adapted_sites, build

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.constants import (  # noqa: E402
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_IA3_FEEDFORWARD,
)
from peft.utils.constants import (  # noqa: E402
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_IA3,
)
from peft.utils.constants import (  # noqa: E402
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA,
)

FAMILIES = list(BUILDERS)

# Families PEFT (0.21) has no default mapping for: the names a PEFT user gives instead,
# the query and value projections (Phi-3's are fused into qkv_proj).
LORA_NAMES_WITHOUT_A_PEFT_DEFAULT = {
    "phi3": ["qkv_proj"],
    "whisper": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
}

# IA³: our default is the paper's (Liu et al. 2022): keys, values, and the input of each
# feed-forward output layer, the same roles in every family. Where PEFT's table picks other
# layers we deliberately differ; the row gives the reason and the PEFT configuration that
# selects what we select (target modules, feed-forward modules).
IA3_DIFFERS = {
    "gemma2": ("PEFT's table scales q_proj and v_proj; the paper scales keys and values",
               ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": ("PEFT's table scales q_proj and v_proj; the paper scales keys and values",
              ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bart": ("PEFT's table scales q_proj and v_proj; the paper scales keys and values",
             ["k_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": ("PEFT's table scales q_proj and k_proj; the paper scales keys and values",
            ["k_proj", "v_proj", "fc2"], ["fc2"]),
    "bert": ("PEFT's suffix 'output.dense' also catches attention.output.dense, the attention "
             "output projection, and scales its input as a feed-forward layer's",
             r".*\.(key|value|layer\.\d+\.output\.dense)", r".*\.layer\.\d+\.output\.dense"),
    "roberta": ("as bert", r".*\.(key|value|layer\.\d+\.output\.dense)",
                r".*\.layer\.\d+\.output\.dense"),
}
IA3_WITHOUT_A_PEFT_DEFAULT = {  # the paper's layers, by the family's own names
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "whisper": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


def _peft_adapted(model: nn.Module, config: object) -> tuple[list[str], set[str]]:
    """Qualified names of the layers ``get_peft_model`` adapts, and those it treats as
    feed-forward (IA³ scales their input)."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    inner = wrapped.base_model.model
    layers = {q: m for q, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}
    return sorted(layers), {q for q, m in layers.items() if getattr(m, "is_feedforward", False)}


def _ours(adapted: nn.Module, pass_name: str) -> list[str]:
    return sorted(adapted_sites(adapted, pass_name))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_default_roles_select_what_peft_selects(family: str) -> None:
    model = build(family)
    if family in LORA_NAMES_WITHOUT_A_PEFT_DEFAULT:
        assert PEFT_LORA.get(family) is None
        config = peft.LoraConfig(r=2, target_modules=LORA_NAMES_WITHOUT_A_PEFT_DEFAULT[family])
    else:
        config = peft.LoraConfig(r=2)
    expected, _ = _peft_adapted(model, config)
    assert expected
    assert _ours(apply_passes(model, [LoRAPass(rank=2)]), "lora") == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_default_roles_select_what_peft_selects(family: str) -> None:
    model = build(family)
    if family in IA3_DIFFERS:
        _, targets, feedforward = IA3_DIFFERS[family]
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
        default, _ = _peft_adapted(model, peft.IA3Config())
    elif family in IA3_WITHOUT_A_PEFT_DEFAULT:
        assert PEFT_IA3.get(family) is None and PEFT_IA3_FEEDFORWARD.get(family) is None
        targets, feedforward = IA3_WITHOUT_A_PEFT_DEFAULT[family]
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
        default = None
    else:
        config, default = peft.IA3Config(), None
    expected, expected_ff = _peft_adapted(model, config)
    adapted = apply_passes(model, [IA3Pass()])
    ours = _ours(adapted, "ia3")
    assert ours == expected
    if default is not None:  # the row above is a real difference from PEFT's default
        assert ours != default
    vectors = {m.site: m.mode for m in adapted.modules() if type(m).__name__ == "IA3Vector"}
    assert {q for q, mode in vectors.items() if mode == "input"} == expected_ff

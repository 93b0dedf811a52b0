"""Bad inputs to ``apply_passes``: the passes list, layers a pass cannot adapt, models that
cannot be traced, mismatched example inputs, integer weights, adapter names that collide.
The model given, plain or already adapted, must come out unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_inputs.catalogue import Case, check_case, params
from bad_inputs.models import (
    HIDDEN,
    IDS,
    attn,
    broken,
    int8_weight,
    lora_default,
    lora_xy,
    quantized,
    shape_checked,
    tiny,
)

from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    ParallelAdapterPass,
    PrefixPass,
    SerialAdapterPass,
    TraceError,
    UnsupportedSiteError,
    apply_passes,
)


class Run:
    """A call that applies ``passes`` with the ``apply_passes`` keywords ``kw``."""

    def __init__(self, *passes: object, **kw: object) -> None:
        self.passes, self.kw = list(passes), kw

    def __call__(self, model: torch.nn.Module, tmp: Path, **more: object) -> object:
        return apply_passes(model, self.passes, **self.kw, **more)


run = Run


MHA_WHY = r"nn\.MultiheadAttention"
INT_WEIGHT = r"fc1 \(Linear\) holds its weight as torch\.int8"

CASES = [
    # the passes list
    Case("passes-item-not-a-pass", tiny, lambda m, d: apply_passes(m, [LoRAPass(), "ia3"]),
         ConfigError, (r"apply_passes: item 1 is a str", r"'ia3'")),
    Case("passes-item-a-class", tiny, lambda m, d: apply_passes(m, [LoRAPass]), ConfigError,
         (r"apply_passes: item 0 is the class LoRAPass", r"LoRAPass\(\.\.\.\)")),
    Case("passes-a-class", tiny, lambda m, d: apply_passes(m, IA3Pass), ConfigError,
         (r"the class IA3Pass", r"IA3Pass\(\.\.\.\)")),
    Case("passes-none", tiny, lambda m, d: apply_passes(m, None), ConfigError,
         (r"apply_passes: passes must be a pass or a list of passes, got None",)),
    Case("passes-a-string", tiny, lambda m, d: apply_passes(m, "lora"), ConfigError,
         (r"apply_passes", r"got 'lora' \(str\)")),
    Case("passes-a-map", tiny, lambda m, d: apply_passes(m, {"lora": LoRAPass()}), ConfigError,
         (r"apply_passes", r"\(dict\)")),
    # layers a pass cannot adapt
    Case("lora-on-layernorm", tiny, run(LoRAPass(pattern="norm")), UnsupportedSiteError,
         ("LoRAPass", r"'norm' selects norm, a LayerNorm", r"nn\.Linear")),
    Case("lora-on-mha", tiny, run(LoRAPass(pattern="attn")), UnsupportedSiteError,
         ("LoRAPass", r"selects attn", MHA_WHY)),
    Case("lora-on-mha-out-proj", tiny, run(LoRAPass(pattern="attn.out_proj")),
         UnsupportedSiteError, ("LoRAPass", r"attn\.out_proj \(inside attn\)", MHA_WHY)),
    Case("lora-role-query-of-mha", tiny, run(LoRAPass(role="query")), UnsupportedSiteError,
         ("LoRAPass", r"role\(s\) \['query'\]", MHA_WHY)),
    Case("ia3-on-embedding", tiny, run(IA3Pass(pattern="emb")), UnsupportedSiteError,
         ("IA3Pass", r"selects emb, a Embedding")),
    Case("ia3-on-layernorm", tiny, run(IA3Pass(pattern="norm")), UnsupportedSiteError,
         ("IA3Pass", r"LayerNorm")),
    Case("ia3-on-mha-out-proj", tiny, run(IA3Pass(pattern="attn.out_proj")),
         UnsupportedSiteError, ("IA3Pass", MHA_WHY)),
    Case("serial-on-layernorm", tiny, run(SerialAdapterPass(pattern="norm", bottleneck=4)),
         UnsupportedSiteError, ("SerialAdapterPass", r"LayerNorm")),
    Case("serial-on-mha-out-proj", tiny,
         run(SerialAdapterPass(pattern="attn.out_proj", bottleneck=4)), UnsupportedSiteError,
         ("SerialAdapterPass", MHA_WHY)),
    Case("parallel-on-embedding", tiny, run(ParallelAdapterPass(pattern="emb", bottleneck=4)),
         UnsupportedSiteError, ("ParallelAdapterPass", r"Embedding")),
    Case("prefix-on-layernorm", tiny, run(PrefixPass(length=2, pattern="norm")), NoMatchError,
         ("PrefixPass", r"'norm' matches no attention module", r"attn")),
    # a later pass fails: the earlier one's work is rolled back
    Case("second-pass-fails", tiny, run(LoRAPass(pattern="fc1"), IA3Pass(pattern="emb")),
         UnsupportedSiteError, ("IA3Pass", r"Embedding")),
    # tracing: selection by role, or a pass that needs the map
    Case("forward-raises-role", broken, run(LoRAPass(role="ffn_up")), TraceError,
         ("LoRAPass", r"could not trace Broken", r"this forward always fails|fx")),
    Case("forward-raises-default-roles-with-inputs", broken, run(IA3Pass(), example_inputs=(IDS,)),
         TraceError, ("IA3Pass", r"this forward always fails")),
    Case("forward-raises-prefix", broken, run(PrefixPass(length=2), example_inputs=(IDS,)),
         TraceError, ("PrefixPass", r"Broken")),
    Case("untraceable-without-inputs", shape_checked, run(IA3Pass()), TraceError,
         ("IA3Pass", r"could not trace ShapeChecked", r"example_inputs")),
    # mismatched example inputs (torch.export runs them on a weight-free copy)
    Case("example-inputs-wrong-shape", shape_checked,
         run(IA3Pass(), example_inputs=(torch.zeros(2, 3, 5),)), TraceError,
         ("IA3Pass", r"expected width 8, got 5")),
    Case("example-inputs-too-many", shape_checked, run(IA3Pass(), example_inputs=(HIDDEN, HIDDEN)),
         TraceError, ("IA3Pass", r"too many positional arguments")),
    Case("example-inputs-none-given", shape_checked, run(IA3Pass(), example_inputs=()),
         TraceError, ("IA3Pass", r"missing a required argument: 'x'")),
    Case("example-kwargs-not-taken", shape_checked,
         run(IA3Pass(), example_inputs=(HIDDEN,), example_kwargs={"mask": HIDDEN}), TraceError,
         ("IA3Pass", r"unexpected keyword argument 'mask'")),
    Case("example-inputs-a-list", shape_checked, run(IA3Pass(), example_inputs=[HIDDEN]),
         TraceError, ("IA3Pass", r"'list' object has no attribute 'shape'")),
    # integer weights
    Case("lora-on-int8-weight", int8_weight, run(LoRAPass(pattern="fc1")), UnsupportedSiteError,
         ("LoRAPass", INT_WEIGHT, r"floating-point model")),
    Case("ia3-on-int8-weight", int8_weight, run(IA3Pass(pattern="fc1")), UnsupportedSiteError,
         ("IA3Pass", INT_WEIGHT)),
    Case("serial-on-int8-weight", int8_weight,
         run(SerialAdapterPass(pattern="fc1", bottleneck=4)), UnsupportedSiteError,
         ("SerialAdapterPass", r"fc1 holds its weight as torch\.int8")),
    Case("parallel-on-int8-weight", int8_weight,
         run(ParallelAdapterPass(pattern="fc1", bottleneck=4)), UnsupportedSiteError,
         ("ParallelAdapterPass", r"fc1 holds its weight as torch\.int8")),
    Case("lora-on-quantized-linear", quantized, run(LoRAPass(pattern="fc1")),
         UnsupportedSiteError, ("LoRAPass", r"selects fc1, a quantized torch\.ao\.nn\.quantized",
                                r"before quantizing")),
    Case("ia3-on-quantized-linear", quantized, run(IA3Pass(pattern="fc*")), UnsupportedSiteError,
         ("IA3Pass", r"quantized")),
    Case("serial-on-quantized-linear", quantized,
         run(SerialAdapterPass(pattern="fc1", bottleneck=4)), UnsupportedSiteError,
         ("SerialAdapterPass", r"quantized")),
    # adapter names that collide
    Case("same-name-same-layer-twice", tiny, run(LoRAPass(pattern="fc1"), LoRAPass(pattern="fc*")),
         AlreadyAdaptedError, ("LoRAPass", r"fc1 \(Linear\) already has an adapter named "
                                           r"'default'")),
    Case("same-name-on-adapted-model", lora_default, run(LoRAPass(pattern="fc1")),
         AlreadyAdaptedError, ("LoRAPass", r"'default'", r"another name=")),
    Case("same-name-on-adapted-model-partial", lora_xy, run(LoRAPass(pattern="fc*", name="y")),
         AlreadyAdaptedError, ("LoRAPass", r"fc1 .* named 'y'")),
    Case("ia3-same-name-twice", tiny, run(IA3Pass(pattern="fc1"), IA3Pass(pattern="fc1")),
         AlreadyAdaptedError, ("IA3Pass", r"'default'")),
    Case("adapted-model-bad-second-pass", lora_xy, run(IA3Pass(pattern="norm")),
         UnsupportedSiteError, ("IA3Pass", r"LayerNorm")),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_apply(case: Case, tmp_path: Path, snapshot) -> None:
    check_case(case, tmp_path, snapshot)


IN_PLACE = [c for c in CASES if isinstance(c.call, Run) and c.model in (tiny, lora_xy)]


@pytest.mark.parametrize("case", params(IN_PLACE))
def test_bad_apply_inplace(case: Case, tmp_path: Path, snapshot) -> None:
    """The same calls with ``inplace=True`` also leave the model exactly as it was."""
    call = case.call
    assert isinstance(call, Run)
    inplace = Case(case.id, case.model, lambda m, d: call(m, d, inplace=True), case.error,
                   case.says, case.gap)
    check_case(inplace, tmp_path, snapshot)

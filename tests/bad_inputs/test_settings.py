"""Bad settings of the passes: patterns, rank, alpha, dropout, names, bottleneck, placement,
prefix length. Most are refused when the pass is built, before any model is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs.catalogue import Case, check_case, params
from bad_inputs.models import tiny

from surgery import (
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    ParallelAdapterPass,
    PrefixPass,
    SerialAdapterPass,
    apply_passes,
)


def lora(**kw: object) -> object:
    """A call that builds ``LoRAPass(**kw)`` and applies it."""
    return lambda m, d: apply_passes(m, [LoRAPass(**kw)])


NAN = float("nan")

CASES = [
    # patterns: the selection language
    Case("pattern-empty-list", tiny, lora(pattern=[]), ConfigError,
         ("LoRAPass", r"empty list")),
    Case("pattern-empty-string", tiny, lora(pattern=""), ConfigError,
         ("LoRAPass", r"non-empty string, got ''")),
    Case("pattern-bad-regex", tiny, lora(pattern="re:("), ConfigError,
         ("LoRAPass", r"invalid regular expression in pattern 're:\('")),
    Case("pattern-not-a-string", tiny, lora(pattern=3), ConfigError,
         ("LoRAPass", r"got 3 \(int\)")),
    Case("pattern-glob-matches-nothing", tiny, lora(pattern="blocks.*"), NoMatchError,
         ("LoRAPass", r"'blocks\.\*' matches no module", r"fc1")),
    Case("exclude-matches-nothing", tiny, lora(pattern="fc*", exclude="fc3"), NoMatchError,
         ("LoRAPass", r"exclude pattern 'fc3'")),
    Case("exclude-removes-everything", tiny, lora(pattern="fc*", exclude="fc*"), NoMatchError,
         ("LoRAPass", r"empty after exclude='fc\*'")),
    Case("ia3-pattern-bad-regex", tiny, lambda m, d: IA3Pass(pattern=["fc1", "re:[a-"]),
         ConfigError, ("IA3Pass", r"'re:\[a-'")),
    # rank, alpha, dropout
    Case("rank-0", tiny, lora(pattern="fc1", rank=0), ConfigError,
         ("LoRAPass", r"rank must be a positive int, got 0\b")),
    Case("rank-negative", tiny, lora(pattern="fc1", rank=-4), ConfigError,
         ("LoRAPass", r"got -4\b")),
    Case("rank-float", tiny, lora(pattern="fc1", rank=2.5), ConfigError,
         ("LoRAPass", r"rank .* got 2\.5")),
    Case("rank-string", tiny, lora(pattern="fc1", rank="8"), ConfigError,
         ("LoRAPass", r"rank .* got '8'")),
    Case("rank-bool", tiny, lora(pattern="fc1", rank=True), ConfigError,
         ("LoRAPass", r"rank .* got True")),
    Case("rank-for-0", tiny, lora(pattern="fc1", rank_for={"fc1": 0}), ConfigError,
         ("LoRAPass", r"rank_for\['fc1'\].* got 0")),
    Case("alpha-0", tiny, lora(pattern="fc1", alpha=0), ConfigError,
         ("LoRAPass", r"alpha must be a positive number.* got 0\b")),
    Case("alpha-negative", tiny, lora(pattern="fc1", alpha=-1.0), ConfigError,
         ("LoRAPass", r"got -1\.0")),
    Case("alpha-nan", tiny, lora(pattern="fc1", alpha=NAN), ConfigError,
         ("LoRAPass", r"alpha .* got nan")),
    Case("alpha-inf", tiny, lora(pattern="fc1", alpha=float("inf")), ConfigError,
         ("LoRAPass", r"alpha .* got inf")),
    Case("dropout-negative", tiny, lora(pattern="fc1", dropout=-0.1), ConfigError,
         ("LoRAPass", r"dropout must be in \[0, 1\).* got -0\.1")),
    Case("dropout-1", tiny, lora(pattern="fc1", dropout=1.0), ConfigError,
         ("LoRAPass", r"dropout .* got 1\.0")),
    Case("dropout-string", tiny, lora(pattern="fc1", dropout="0.1"), ConfigError,
         ("LoRAPass", r"dropout .* got '0\.1'")),
    Case("dropout-word", tiny, lora(pattern="fc1", dropout="high"), ConfigError,
         ("LoRAPass", r"dropout .* got 'high'")),
    Case("dropout-none", tiny, lora(pattern="fc1", dropout=None), ConfigError,
         ("LoRAPass", r"dropout .* got None")),
    # adapter names
    Case("name-with-dot", tiny, lora(pattern="fc1", name="task.a"), ConfigError,
         ("LoRAPass", r"'task\.a' contains '\.'", r"name='task_a'")),
    Case("name-empty", tiny, lora(pattern="fc1", name=""), ConfigError,
         ("LoRAPass", r"non-empty")),
    Case("name-not-a-string", tiny, lora(pattern="fc1", name=1), ConfigError,
         ("LoRAPass", r"got 1 of type int")),
    Case("name-a-moduledict-attribute", tiny, lora(pattern="fc1", name="update"), ConfigError,
         ("LoRAPass", r"'update' is an attribute of nn\.ModuleDict")),
    Case("ia3-name-with-dot", tiny, lambda m, d: IA3Pass(pattern="fc1", name="a.b"),
         ConfigError, ("IA3Pass", r"'a\.b'")),
    Case("serial-name-a-moduledict-attribute", tiny,
         lambda m, d: SerialAdapterPass(pattern="fc1", bottleneck=4, name="keys"), ConfigError,
         ("SerialAdapterPass", r"'keys'")),
    # bottleneck adapters
    Case("bottleneck-0", tiny, lambda m, d: SerialAdapterPass(pattern="fc1", bottleneck=0),
         ConfigError, ("SerialAdapterPass", r"bottleneck must be a positive int, got 0\b")),
    Case("bottleneck-negative", tiny,
         lambda m, d: SerialAdapterPass(pattern="fc1", bottleneck=-8), ConfigError,
         ("SerialAdapterPass", r"got -8")),
    Case("parallel-bottleneck-0", tiny,
         lambda m, d: ParallelAdapterPass(pattern="fc1", bottleneck=0), ConfigError,
         ("ParallelAdapterPass", r"got 0\b")),
    Case("reduction-factor-0", tiny,
         lambda m, d: SerialAdapterPass(pattern="fc1", reduction_factor=0), ConfigError,
         ("SerialAdapterPass", r"reduction_factor .* got 0\b")),
    Case("placement-unknown", tiny,
         lambda m, d: SerialAdapterPass(pattern="fc1", bottleneck=4, placement="middle"),
         ConfigError, ("SerialAdapterPass", r"'middle'", r"houlsby")),
    Case("activation-unknown", tiny,
         lambda m, d: SerialAdapterPass(pattern="fc1", bottleneck=4, activation="swish2"),
         ConfigError, ("SerialAdapterPass", r"'swish2'", r"gelu")),
    Case("parallel-scaling-nan", tiny,
         lambda m, d: ParallelAdapterPass(pattern="fc1", bottleneck=4, scaling=NAN),
         ConfigError, ("ParallelAdapterPass", r"scaling .* got nan")),
    # prefix
    Case("prefix-length-negative", tiny, lambda m, d: PrefixPass(length=-3), ConfigError,
         ("PrefixPass", r"length must be an int >= 0, got -3")),
    Case("prefix-length-string", tiny, lambda m, d: PrefixPass(length="4"), ConfigError,
         ("PrefixPass", r"got '4'")),
    Case("prefix-mode-unknown", tiny, lambda m, d: PrefixPass(length=2, mode="kv"),
         ConfigError, ("PrefixPass", r"'kv'")),
    Case("prefix-role-projection", tiny, lambda m, d: PrefixPass(length=2, role="query"),
         ConfigError, ("PrefixPass", r"'query'")),
    # IA3
    Case("ia3-fused-unknown", tiny, lambda m, d: IA3Pass(fused="qkv"), ConfigError,
         ("IA3Pass", r"'qkv'")),
    Case("ia3-feedforward-matches-nothing", tiny,
         lambda m, d: apply_passes(m, [IA3Pass(pattern=["fc1", "fc2"], feedforward="mlp.*")]),
         NoMatchError, ("IA3Pass", r"feedforward pattern 'mlp\.\*'", r"fc1")),
    Case("ia3-feedforward-outside-selection", tiny,
         lambda m, d: apply_passes(m, [IA3Pass(pattern="fc1", feedforward="fc2")]),
         NoMatchError, ("IA3Pass", r"'fc2' matches none of the selected")),
    Case("ia3-feedforward-bad-regex", tiny, lambda m, d: IA3Pass(feedforward="re:("),
         ConfigError, ("IA3Pass", r"'re:\('")),
    # structural roles
    Case("role-unknown", tiny, lora(role="quary"), ConfigError,
         (r"unknown role 'quary'", r"query")),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_setting(case: Case, tmp_path: Path, snapshot) -> None:
    check_case(case, tmp_path, snapshot)

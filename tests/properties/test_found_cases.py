"""Cases the property tests found, kept as explicit tests.

A pass that selects by structural role on a model torch.fx cannot trace (here: an eager
causal mask built with ``torch.ones(n, n)`` from traced sizes), given no example inputs,
must raise a ``TraceError`` that names the pass and the way out (DESIGN.md, invariant 5),
and leave the model as it was. SerialAdapterPass (placement by role), ParallelAdapterPass
and PrefixPass used to let the map's bare ``TraceError`` ("could not trace Transformer ...")
through; ``apply_passes`` now names the pass for every pass.
"""

from __future__ import annotations

import pytest
import torch

import surgery
from conftest import ModelSnapshot
from properties.models import BlockConfig, Transformer


def _untraceable() -> Transformer:
    """One post-LN block with eager causal attention: torch.fx fails on its mask."""
    cfg = BlockConfig(d=8, heads=1, kv_heads=1, ffn=8, attention="eager", causal=True,
                      pre_ln=False, gated=False, bias=False, act="gelu")
    torch.manual_seed(0)
    return Transformer(cfg, 1, 11, False, 5, 4, False, False, "none", False).eval()


@pytest.mark.parametrize("make, who", [
    (lambda: surgery.LoRAPass(), "LoRAPass"),
    (lambda: surgery.IA3Pass(), "IA3Pass"),
    (lambda: surgery.SerialAdapterPass(), "SerialAdapterPass"),
    (lambda: surgery.SerialAdapterPass(role="ffn_down"), "SerialAdapterPass"),
    (lambda: surgery.ParallelAdapterPass(), "ParallelAdapterPass"),
    (lambda: surgery.ParallelAdapterPass(role="attention"), "ParallelAdapterPass"),
    (lambda: surgery.PrefixPass(length=2), "PrefixPass"),
    (lambda: surgery.PrefixPass(length=2, gate="zero", pattern="attn"), "PrefixPass"),
], ids=["lora", "ia3", "serial-houlsby", "serial-role", "parallel-ffn", "parallel-attention",
        "prefix", "prefix-pattern"])
def test_trace_error_by_role_names_the_pass(make, who: str) -> None:
    model = _untraceable()
    before = ModelSnapshot.of(model)
    with pytest.raises(surgery.TraceError) as info:
        surgery.apply_passes(model, [make()])
    before.assert_unchanged(model)
    message = str(info.value)
    assert message.startswith(f"{who}:"), message
    assert "example_inputs=" in message, message

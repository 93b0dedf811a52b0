"""Fixtures of the visualize tests; the models themselves live in ``viz_models``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from viz_models import SITE, TinyNet, example_ids

from surgery import LoRAPass, apply_passes
from surgery.map.trace import trace


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_adapted(tiny: TinyNet) -> nn.Module:
    """``tiny`` with LoRA (rank 2) on ``blocks.0.attn.q_proj``, example inputs recorded."""
    return apply_passes(tiny, [LoRAPass(pattern=SITE, rank=2)], example_inputs=(example_ids(),))


@pytest.fixture(scope="module")
def branchy() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(branchy=True)


@pytest.fixture(scope="module")
def branchy_map(branchy: TinyNet) -> nn.Module:
    """The map of ``branchy``, traced by torch.export (fx cannot), shared by a module's tests."""
    return trace(branchy, (example_ids(),))

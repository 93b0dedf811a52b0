"""Fixtures of the visualize tests; the models themselves live in ``viz_models``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery.map.trace import trace
from viz_models import TinyNet, adapt_by_hand, example_ids


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_adapted(tiny: TinyNet) -> nn.Module:
    """``tiny`` traced by torch.fx with shapes, LoRA-like branch on ``blocks.0.attn.q_proj``."""
    return adapt_by_hand(trace(tiny, (example_ids(),)), "blocks.0.attn.q_proj")


@pytest.fixture(scope="module")
def branchy() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(branchy=True)


@pytest.fixture(scope="module")
def branchy_traced(branchy: TinyNet) -> nn.Module:
    """``branchy`` traced by torch.export (fx cannot), shared by a module's tests."""
    return trace(branchy, (example_ids(),))

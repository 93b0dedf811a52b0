"""Fixtures of the training-setup tests."""

from __future__ import annotations

import pytest
from torch import Tensor

from integration.cases import CASES, adapter_grads, build


@pytest.fixture(scope="session")
def one_process() -> dict[str, dict[str, Tensor]]:
    """Adapter gradients of every case of :data:`integration.cases.CASES` on its whole
    batch, in this process, eager, without checkpointing: the reference of the other tests.

    The distributed tests ask for it before they launch, so forked processes inherit the
    imported model code.
    """
    grads = {}
    for name in CASES:
        case = build(name)
        case.loss(case.model, case.batch).backward()
        grads[name] = adapter_grads(case.model)
    return grads

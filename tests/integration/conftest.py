"""Fixtures of the training-setup tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import Tensor

from helpers import torch_threads
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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored after.

    These models are so small that threads only add synchronisation; on a loaded two-core
    machine two OpenMP threads waiting for each other turn a 10 ms step into up to a second.
    """
    with torch_threads(1):
        yield

"""The parity models are tiny: run them on one thread (faster than a thread pool on a busy
machine), and give the previous setting back afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import torch_threads


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` while the parity tests run."""
    with torch_threads(1):
        yield

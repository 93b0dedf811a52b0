"""Adapted models under FSDP2 (``torch.distributed.fsdp.fully_shard``), gloo, two CPU processes.

Every block and then the root are sharded over a one-dimensional CPU device mesh; frozen
base parameters and trainable adapters share the blocks' parameter groups. The gradients,
reduce-scattered (averaged) and gathered back, equal one process's on the whole batch.
"""

from __future__ import annotations

import pytest

from integration.cases import CASES
from integration.fsdp_worker import fsdp_step
from integration.grads import assert_grads_close
from integration.launch import run_on_two_ranks

RTOL = 1e-6
"""Relative (norm-wise) tolerance against one process: the same float32 terms summed in
another order (measured: below 2e-7)."""


@pytest.fixture(scope="module")
def ranks(one_process: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results of :func:`integration.fsdp_worker.fsdp_step`."""
    return run_on_two_ranks(fsdp_step, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_adapter_gradients_equal_one_process_on_the_whole_batch(
        ranks: list[dict], one_process: dict, name: str) -> None:
    for result in ranks:
        assert result[name]["sharded"], "adapter parameters and gradients are DTensors"
        assert result[name]["frozen"] == [], "a frozen parameter got a gradient"
        assert_grads_close(result[name]["grads"], one_process[name], RTOL)

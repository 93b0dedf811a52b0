"""Adapted models under ``DistributedDataParallel`` (gloo, two CPU processes).

With ``find_unused_parameters=False`` every adapter must take part in each step and the
frozen base must stay out of DDP's reducer: the gradient allreduce then carries the
adapters only, and the averaged gradients equal one process's gradients on the whole batch.
The reducer's contents are read from DDP's logging data (parameter tensors, bytes and
bucket sizes the reducer was built with).
"""

from __future__ import annotations

import pytest
import torch

from integration.cases import CASES, build
from integration.ddp_worker import ddp_step
from integration.grads import assert_grads_close
from integration.launch import run_on_two_ranks

RTOL = 1e-6
"""Relative (norm-wise) tolerance between the allreduced gradients and one process's:
the two sum the same float32 terms in another order (measured: below 2e-7)."""


@pytest.fixture(scope="module")
def ranks(one_process: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results of :func:`integration.ddp_worker.ddp_step` (one launch for all cases)."""
    return run_on_two_ranks(ddp_step, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("name", list(CASES))
def test_allreduced_adapter_gradients_equal_one_process_on_the_whole_batch(
        ranks: list[dict], one_process: dict, name: str) -> None:
    zero, one = ranks[0][name]["grads"], ranks[1][name]["grads"]
    want = one_process[name]
    assert zero.keys() == one.keys() == want.keys()
    for n in want:
        assert torch.equal(zero[n], one[n]), f"{n}: the ranks disagree after the allreduce"
    assert_grads_close(zero, want, RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_parameters_stay_out_of_the_reducer(ranks: list[dict], name: str) -> None:
    model = build(name).model
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.parameters()))
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    for result in ranks:
        assert result[name]["frozen"] == [], "a frozen parameter got a gradient"
        logging = result[name]["logging"]
        assert logging["num_parameter_tensors"] == len(trainable)
        assert logging["total_parameter_size_bytes"] == trainable_bytes
        buckets = [int(b) for b in logging["bucket_sizes"].split(",")]
        assert sum(buckets) == trainable_bytes, "DDP's buckets hold exactly the adapters"

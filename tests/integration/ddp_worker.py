"""What each process of the DDP test computes (module-level functions, so that
spawned processes can import them)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from integration.cases import BATCH, CASES, adapter_grads, base_grads, build

__all__ = ["ddp_step"]


def ddp_step(rank: int) -> dict[str, Any]:
    """Two forward and backward passes (no update) of every case under DDP on this rank's
    half of the batch; what the second left.

    Returns, per case name: ``grads`` (adapter gradients after DDP's allreduce), ``frozen``
    (names of frozen parameters holding a gradient) and ``logging`` (the reducer's own
    account, from DDP's logging data: parameter tensors, their bytes, bucket sizes).
    """
    world = dist.get_world_size()
    half = BATCH // world
    results = {}
    for name in CASES:
        case = build(name)
        ddp = DistributedDataParallel(case.model, find_unused_parameters=False)
        mine = case.batch[rank * half:(rank + 1) * half]
        for _ in range(2):  # the second step finds an adapter the first left out, and runs
            ddp.zero_grad(set_to_none=True)  # on the buckets rebuilt after the first
            case.loss(ddp, mine).backward()
        logging = ddp._get_ddp_logging_data()
        results[name] = {
            "grads": adapter_grads(case.model),
            "frozen": base_grads(case.model),
            "logging": {k: logging[k] for k in ("num_parameter_tensors",
                                                "total_parameter_size_bytes", "bucket_sizes")},
        }
    return results

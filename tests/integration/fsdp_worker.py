"""What each process of the FSDP2 test computes (module-level functions, so that
spawned processes can import them)."""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import surgery
from integration.cases import BATCH, CASES, base_grads, build

__all__ = ["fsdp_step", "blocks"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: TinyTransformer's ``layers``, LLaMA's
    ``model.layers``; none for the MLP (only the root is sharded)."""
    for path in ("layers", "model.layers"):
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    return []


def fsdp_step(rank: int) -> dict[str, Any]:
    """One forward and backward of every case under ``fully_shard`` on this rank's half.

    Each block is sharded, then the root; gradients are reduce-scattered (averaged) and
    gathered back to whole tensors here.

    Returns, per case name: ``grads`` (whole adapter gradients), ``sharded`` (whether every
    adapter parameter and gradient was a ``DTensor``) and ``frozen`` (frozen parameters
    holding a gradient).
    """
    world = dist.get_world_size()
    half = BATCH // world
    mesh = init_device_mesh("cpu", (world,))
    # TinyTransformer's logits come out of a reshape, a view; the loss never writes into it.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    results = {}
    for name in CASES:
        case = build(name)
        for block in blocks(case.model):
            fully_shard(block, mesh=mesh)
        fully_shard(case.model, mesh=mesh)
        mine = case.batch[rank * half:(rank + 1) * half]
        case.loss(case.model, mine).backward()
        trainable = surgery.named_trainable_parameters(case.model)
        results[name] = {
            "grads": {n: p.grad.full_tensor() for n, p in trainable},
            "sharded": all(isinstance(p, DTensor) and isinstance(p.grad, DTensor)
                           for _, p in trainable),
            "frozen": base_grads(case.model),
        }
    return results

"""Run a function on two CPU processes joined by a gloo process group on the loopback.

The processes are started with :func:`torch.multiprocessing.start_processes`, forked on
Linux and spawned elsewhere. Forking is what keeps a launch at a second or two: spawned
processes import torch, transformers' LLaMA and the package again, which takes about
20 s per pair of processes on two cores. It is safe here because the parent has no process
group and each child runs with one intra-op thread (as DataLoader workers do), so no
OpenMP pool inherited from the parent is used.

Each process joins the group at ``127.0.0.1`` on a port the operating system just handed
out, over the loopback device, and writes what it computed with :func:`torch.save` to
``<out>/rank<r>.pt``, which :func:`run_on_two_ranks` reads back. A process that raises makes
the launch raise with its traceback; one that hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["WORLD", "run_on_two_ranks"]

WORLD = 2
"""Processes in the group."""

START_METHOD = "fork" if sys.platform == "linux" else "spawn"
"""How the processes start (see the module docstring)."""

LOOPBACK = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
"""The loopback device gloo's connections go over (else gloo picks one from the host name)."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[int], Any], port: int, out: str) -> None:
    """Body of one started process: join the group, run ``fn(rank)``, save its result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if LOOPBACK:
        os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = fn(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_on_two_ranks(fn: Callable[[int], Any], out: Path, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank)`` in two processes of a gloo group and return their results by rank.

    Args:
        fn: a module-level function (spawned processes import it by name) taking the rank
            and returning something :func:`torch.save` can store (tensors, dicts, lists).
        out: an existing directory for the results.
        timeout: seconds after which the processes are terminated.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a process raised (its traceback is in
            the message).
        TimeoutError: the processes were still running after ``timeout`` seconds.
    """
    context = mp.start_processes(_entry, args=(fn, _free_port(), str(out)), nprocs=WORLD,
                                 join=False, start_method=START_METHOD)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise TimeoutError(f"the {WORLD} processes running {fn.__name__} took over {timeout} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

"""Wall-clock and CPU-time medians, in interleaved rounds.

Every round runs each contender once, the first one rotating from round to round, so that a
machine busy with other work slows all of them alike; the medians are over rounds, after
warm-up runs (lazy imports, first-call caches). CPU time (this process, all threads) is
recorded beside wall-clock time: other processes disturb it less.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from cases import LR, WAYS, Case, build, fresh_input, loss, output
from torch import nn


@dataclass
class Timing:
    """Medians over rounds, in seconds."""

    wall: float
    cpu: float


def interleaved(contenders: Mapping[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
                rounds: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each contender ``(prepare, run)``: ``prepare()`` (untimed) makes the argument that
    ``run(arg)`` (timed) gets. A garbage collection runs, untimed, before each timed call."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            prepare, run = contenders[name]
            run(prepare())
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            prepare, run = contenders[name]
            arg = prepare()
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            result = run(arg)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            del result, arg
    return {n: Timing(statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def time_apply(c: Case, ways: list[str], rounds: int) -> tuple[dict[str, Timing], dict[str, str]]:
    """Median time of each way in ``ways`` (keys of :data:`cases.WAYS`) to adapt the plain
    model of case ``c``; PEFT's copy of the model is made untimed.

    Returns:
        ``(timings, failures)``: a way that raises in its warm-up run is left out of the
        timings and its error is in ``failures``.
    """
    base = build(c)
    contenders = {}
    failures: dict[str, str] = {}
    for name in ways:
        way = WAYS[name]
        try:
            way.run(c, fresh_input(way, base))
        except Exception as exc:  # noqa: BLE001 (a pass being ported may not work yet: report it)
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        contenders[name] = ((lambda way=way: fresh_input(way, base)),
                            (lambda arg, way=way: way.run(c, arg)))
    return interleaved(contenders, rounds), failures


# --------------------------------------------------------------------------- steps


def eval_step(model: nn.Module, c: Case) -> Callable[[], None]:
    """One forward in eval mode under ``torch.no_grad()``."""
    model.eval()

    def step() -> None:
        with torch.no_grad():
            output(model, c)

    return step


def train_step(model: nn.Module, c: Case) -> Callable[[], None]:
    """One forward + backward + AdamW step over the trainable parameters, in train mode."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(model, c).backward()
        opt.step()

    return step


def time_steps(models: Mapping[str, nn.Module], c: Case, rounds: int,
               train: tuple[str, ...]) -> dict[str, dict[str, Timing]]:
    """``{"eval": {name: Timing}, "train": {name: Timing}}``: every model of ``models`` in
    eval, those named in ``train`` in training; three warm-up steps each."""
    out = {}
    for mode, make, names in (("eval", eval_step, list(models)), ("train", train_step, train)):
        steps = {n: make(models[n], c) for n in names}
        contenders = {n: ((lambda: None), (lambda _, s=s: s())) for n, s in steps.items()}
        out[mode] = interleaved(contenders, rounds, warmup=3)
        for m in models.values():
            m.eval()
    return out

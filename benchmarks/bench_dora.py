"""DoRA train step, fx-surgery against Hugging Face PEFT, side by side, reported as ratios.

On the 4-layer transformers LLaMA configuration of :mod:`cases` (width 256, 4 heads,
feed-forward 1024, vocab 4096, random weights, float32, CPU, batch 4 x 128 tokens), DoRA with
rank 8, alpha 16, no dropout on ``q_proj`` and ``v_proj``: ours
(``LoRAPass(use_dora=True)``) against PEFT's ``LoraConfig(use_dora=True)`` on the same
weights. Before anything is timed the two models are given the same adapter values (``B``
non-zero, magnitudes away from ``‖W‖``) and their losses and logits are compared.

Measured: the train step (forward with the model's own loss, backward, ``AdamW.step()``),
medians of interleaved rounds (:func:`timing.interleaved`), wall-clock and CPU time; a
second PEFT model in the same rounds is the A/A control (what noise alone does to a ratio);
and the torch CPU allocator's peak during one train step after warm-up
(:func:`memory.torch_memory`), new storage only (weights, gradients and optimizer state that
exist before the step are not counted).

Run from the repository root::

    python benchmarks/bench_dora.py --threads 1
    python benchmarks/bench_dora.py --rounds 5     # smoke run

Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from cases import ALPHA, BATCH, RANK, SEQ, build, case, loss, output, peft
from load import LoadSampler
from memory import torch_memory
from timing import interleaved, train_step
from torch import nn

import surgery
from surgery import LoRAPass

LOSS_TOL = 1e-5
"""Largest relative difference of the losses (ours vs PEFT, same weights) accepted."""


def ours_dora(model: nn.Module, targets: tuple[str, ...]) -> nn.Module:
    """``LoRAPass(use_dora=True)`` by pattern on ``model`` (left unchanged)."""
    return surgery.apply_passes(model, [LoRAPass(pattern=list(targets), rank=RANK, alpha=ALPHA,
                                                 use_dora=True)])


def peft_dora(model: nn.Module, targets: tuple[str, ...]) -> nn.Module:
    """PEFT's ``LoraConfig(use_dora=True)`` with the same settings (changes ``model``)."""
    return peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
        use_dora=True))


def same_adapters(ours: nn.Module, *others: nn.Module) -> None:
    """Random ``B`` (N(0, 0.02²)) and magnitudes ``m · U(0.9, 1.1)`` in ours, copied by name
    into each PEFT model."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in surgery.named_trainable_parameters(ours):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif ".lora_magnitude_vector." in name:
                p.mul_(torch.rand(p.shape, generator=gen) * 0.2 + 0.9)
            for other in others:
                q = other.get_parameter("base_model.model." + name)
                if q.shape != p.shape:
                    raise AssertionError(f"{name}: ours {tuple(p.shape)} vs PEFT "
                                         f"{tuple(q.shape)}")
                q.copy_(p)


def check(ours: nn.Module, theirs: nn.Module, c) -> tuple[float, float, float]:
    """``(loss ours, loss PEFT, max |logits ours - PEFT|)`` in train mode.

    Raises:
        AssertionError: the losses differ by more than :data:`LOSS_TOL` (relative), or the
            trainable parameter counts differ.
    """
    n_ours = sum(p.numel() for p in surgery.trainable_parameters(ours))
    n_peft = theirs.get_nb_trainable_parameters()[0]
    if n_ours != n_peft:
        raise AssertionError(f"trainable parameters: ours {n_ours}, PEFT {n_peft}")
    ours.train()
    theirs.train()
    with torch.no_grad():
        a, b = loss(ours, c).item(), loss(theirs, c).item()
        diff = (output(ours, c) - output(theirs, c)).abs().max().item()
    if abs(a - b) > LOSS_TOL * abs(b):
        raise AssertionError(f"losses differ: ours {a!r}, PEFT {b!r}")
    return a, b, diff


def step_peak(model: nn.Module, c, warmup: int = 2) -> int:
    """Allocator peak (bytes, new storage) of one train step after ``warmup`` steps."""
    step = train_step(model, c)
    for _ in range(warmup):
        step()
    return torch_memory(step)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # lora_A's initialisation
    c = case("llama", 4)
    start = time.time()
    with LoadSampler() as load:
        ours = ours_dora(build(c), c.targets)
        theirs = peft_dora(build(c), c.targets)
        control = peft_dora(build(c), c.targets)
        same_adapters(ours, theirs, control)
        loss_ours, loss_peft, diff = check(ours, theirs, c)
        models = {"ours": ours, "peft": theirs, "peft_again": control}
        steps = {n: train_step(m, c) for n, m in models.items()}
        times = interleaved({n: ((lambda: None), (lambda _, s=s: s())) for n, s in steps.items()},
                            args.rounds, warmup=3)
        peaks = {n: step_peak(m, c) for n, m in models.items()}
    t, mib = times, 2 ** 20
    print(f"DoRA train step, {c.name}, batch {BATCH} x {SEQ}, rank {RANK} on "
          f"{', '.join(c.targets)}; torch {torch.__version__} ({torch.get_num_threads()} "
          f"thread(s)), peft {peft.__version__}; medians of {args.rounds} rounds; "
          f"{time.time() - start:.0f} s; load (1 min) {load.summary()}.")
    print(f"same weights: loss ours {loss_ours:.9g}, PEFT {loss_peft:.9g} "
          f"(|diff| {abs(loss_ours - loss_peft):.3g}, tolerance {LOSS_TOL:g} relative); "
          f"max |logits ours - PEFT| {diff:.3g}")
    print()
    print("| | ours | PEFT | ours / PEFT | A/A control | target |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| train step, CPU time | {t['ours'].cpu * 1e3:.1f} ms | {t['peft'].cpu * 1e3:.1f} ms "
          f"| {t['ours'].cpu / t['peft'].cpu:.2f}x | {t['peft_again'].cpu / t['peft'].cpu:.2f}x "
          f"| <= 1.00x |")
    print(f"| train step, wall | {t['ours'].wall * 1e3:.1f} ms | {t['peft'].wall * 1e3:.1f} ms "
          f"| {t['ours'].wall / t['peft'].wall:.2f}x "
          f"| {t['peft_again'].wall / t['peft'].wall:.2f}x | <= 1.00x |")
    print(f"| allocator peak of a step | {peaks['ours'] / mib:.1f} MiB "
          f"| {peaks['peft'] / mib:.1f} MiB | {peaks['ours'] / peaks['peft']:.3f}x "
          f"| {peaks['peft_again'] / peaks['peft']:.3f}x | <= 1.00x |")
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time to apply LoRA by pattern on every architecture of the zoo, against PEFT.

For each tiny transformers model of :func:`surgery.zoo.hf_tiny.tiny_architectures` (two
layers, hidden size 64, random weights; nothing is downloaded) the same LoRA is applied by
both: rank 8, alpha 16, on the modules of PEFT's default target table for that model type
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; where it has none, the attention
projections a PEFT user would name, as the zoo tests do). Ours: ``apply_passes(model,
[LoRAPass(pattern=targets)])``, no example inputs. PEFT: ``get_peft_model`` on a fresh deep copy of the model (the copy, which
PEFT needs because it changes the model it is given, is made untimed; ours leaves the model
alone and makes its own weight-sharing copy inside the timed call).

Medians of interleaved rounds (:func:`timing.interleaved`); the target is ours ≤ 2× PEFT's on
every architecture. An architecture one side cannot adapt is reported with the error.

::

    python benchmarks/bench_zoo_apply.py                     # every architecture, 15 rounds
    python benchmarks/bench_zoo_apply.py --only llama t5 --rounds 30

Not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed beside them).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from timing import interleaved  # noqa: E402

from surgery import LoRAPass, apply_passes  # noqa: E402
from surgery.zoo.hf_tiny import build_tiny, tiny_architectures  # noqa: E402
from zoo.checks import our_pattern, peft_targets  # noqa: E402

RANK, ALPHA = 8, 16


def targets(model_type: str) -> list[str] | str:
    """PEFT's default LoRA targets for ``model_type``, or those the zoo tests give where
    PEFT's table has none (:func:`zoo.checks.peft_targets`)."""
    return peft_targets(model_type)


def measure(model_type: str, rounds: int) -> tuple[float, float] | str:
    """``(ours, PEFT's)`` median seconds to apply, or the error that stopped one side."""
    import peft

    torch.manual_seed(0)
    base = build_tiny(model_type).eval()
    names = targets(model_type)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names)
    ours = [LoRAPass(pattern=our_pattern(names), rank=RANK, alpha=ALPHA)]
    try:
        apply_passes(base, ours)
        peft.get_peft_model(copy.deepcopy(base), config)
    except Exception as exc:  # noqa: BLE001 (reported, not raised: the other rows still run)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    timings = interleaved({
        "ours": (lambda: base, lambda m: apply_passes(m, ours)),
        "peft": (lambda: copy.deepcopy(base), lambda m: peft.get_peft_model(m, config)),
    }, rounds, warmup=2)
    return timings["ours"].wall, timings["peft"].wall


def _shown(names: list[str] | str) -> str:
    return names if isinstance(names, str) else ", ".join(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="model types to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    archs = args.only or tiny_architectures()
    print("| model type | PEFT targets | ours | PEFT | ours / PEFT |")
    print("|---|---|---:|---:|---:|")
    worst = 0.0
    for model_type in archs:
        got = measure(model_type, args.rounds)
        if isinstance(got, str):
            print(f"| {model_type} | {_shown(targets(model_type))} | | | {got} |", flush=True)
            continue
        ours, theirs = got
        worst = max(worst, ours / theirs)
        print(f"| {model_type} | {_shown(targets(model_type))} | {ours * 1e3:.1f} ms "
              f"| {theirs * 1e3:.1f} ms | {ours / theirs:.2f}x |", flush=True)
    print(f"\nworst ratio {worst:.2f}x (target <= 2x); load average {os.getloadavg()[0]:.1f}, "
          f"{args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

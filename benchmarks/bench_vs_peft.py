"""fx-surgery against Hugging Face PEFT, side by side in one run, reported as ratios.

On transformers GPT-2, LLaMA and BERT configurations with random weights (width 256, 4
heads, feed-forward 1024, vocab 4096; nothing is downloaded) this measures:

(a) the time to apply LoRA (r=8, alpha=16, q and v) by pattern, ours against
    ``peft.get_peft_model`` (4 layers; LLaMA also at 12 and 32); on LLaMA, the ways that
    need the map: LoRA by role, the roles alone, the whole map alone, and
    ``PrefixPass(length=8)`` against PEFT's prefix tuning;
(b) the new storage while applying, as a multiple of the model's weight bytes;
(c) forward (eval, no_grad) and train step (forward + backward + AdamW step) times, ours
    against PEFT's and the plain model's, and the merged model's against the plain base;
(d) trainable and total parameter counts, asserted equal to PEFT's.

Times are medians of interleaved rounds (each round runs every contender once, in rotating
order, so that a busy machine slows all of them alike), after warm-up runs. The 1-minute
load average is sampled during the run and reported.

Run from the repository root::

    python benchmarks/bench_vs_peft.py --quick      # smoke run, under 2 minutes
    python benchmarks/bench_vs_peft.py              # full run, writes benchmarks/results.md

Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from cases import FFN, HEADS, HIDDEN, VOCAB, build, case, peft, trace_only, transformers
from contenders import contenders
from load import LoadSampler
from memory import apply_memory
from report import Results, render
from timing import time_apply, time_steps

RESULTS = Path(__file__).resolve().parent / "results.md"
PATTERN_WAYS = ["lora_pattern", "peft_lora", "copy"]
MAP_WAYS = ["lora_role", "roles", "trace", "prefix", "peft_prefix"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer rounds and depths, memory for LoRA by pattern only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steady timings on a busy machine)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    depths = (4,) if args.quick else (4, 12, 32)
    apply_rounds, step_rounds = (2, 3) if args.quick else (7, 21)
    apply_cases = [case("gpt2", 4), *(case("llama", n) for n in depths), case("bert", 4)]
    step_cases = [case("gpt2", 4), case("llama", 4), case("bert", 4)]
    r = Results()
    start = time.time()
    with LoadSampler() as load:
        for c in apply_cases:
            ways = PATTERN_WAYS + (MAP_WAYS if c.family == "llama" else [])
            r.params[c.name] = sum(p.numel() for p in build(c).parameters())
            log(f"{c.name}: time to apply ({', '.join(ways)})")
            r.apply[c.name], r.failures[c.name] = time_apply(c, ways, apply_rounds)
            if "trace" in r.apply[c.name]:
                info = trace_only(c, build(c))._surgery_map
                r.map_frontend[c.name] = info.frontend + (", weight-free" if info.weight_free
                                                          else ", on the real weights")
            log(f"{c.name}: memory while applying")
            r.memory[c.name] = apply_memory(c, PATTERN_WAYS[:2] if args.quick else ways)
        for c in step_cases:
            log(f"{c.name}: checks, then step times")
            k = contenders(c)
            r.contenders[c.name] = k
            train = ("plain", "peft", "ours", "plain_again")
            r.steps[c.name] = time_steps(k.models, c, step_rounds, train)
            del k.models
    threads = torch.get_num_threads()
    header = [
        "# fx-surgery vs PEFT, side by side",
        "",
        f"Configs: transformers GPT-2, LLaMA, BERT; width {HIDDEN}, {HEADS} heads, feed-forward "
        f"{FFN}, vocab {VOCAB}; 4 layers"
        + (f" (LLaMA also {', '.join(map(str, depths[1:]))})" if depths[1:] else "")
        + "; random weights, float32, CPU.  ",
        (f"Run {time.strftime('%Y-%m-%d')}{' (--quick)' if args.quick else ''}: "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({threads} "
        f"thread{'s' if threads != 1 else ''}), transformers {transformers.__version__}, peft "
        f"{peft.__version__}, Python {platform.python_version()}; {time.time() - start:.0f} s.  "),
        f"Apply: medians of {apply_rounds} interleaved rounds; steps: medians of {step_rounds}.  ",
        f"Load average (1 min): {load.summary()}.",
    ]
    text = render(r, header, step_rounds, [])
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        log(f"written to {RESULTS.parent.name}/{RESULTS.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fx-surgery against Hugging Face PEFT, side by side: LoRA (r=8, alpha=16) on q and v.

For GPT-2, LLaMA and BERT configurations with random weights (4 layers, hidden 256, 4
heads, feed-forward 1024, vocab 4096; nothing is downloaded) this measures, in one run:

(a) the time to apply LoRA: ours is ``surgery.apply_passes`` on the plain model, tracing
    (torch.export) included, with its two halves (trace; passes on a traced model) timed
    alone too; PEFT's is ``peft.get_peft_model`` on a fresh copy (the copy is not timed);
(b) time per step on a fixed batch (4 x 128 tokens): forward in eval mode under
    ``torch.no_grad``, and forward + backward in train mode; the plain model is timed too;
(c) memory: bytes of the parameters added and of any other storage the adapted model
    holds; the torch allocator's peak and what stays held while applying (profiler memory
    events); the Python heap's peak and what stays held (tracemalloc); the allocator's peak
    during one training step;
(d) trainable and total parameter counts, which must agree.

Times are medians: of several applications, and of interleaved rounds for steps (each
round runs one step of every implementation, in rotating order, so that a busy machine
slows all of them alike), after warm-up runs. Both front ends are checked to reproduce the
plain model's outputs bitwise before anything is timed.

Run from the repository root::

    python benchmarks/bench_vs_peft.py              # writes benchmarks/results.md
    python benchmarks/bench_vs_peft.py --quick      # fewer repeats, for a smoke run

Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

try:
    import surgery
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery
from surgery import LoRAPass

warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"

import peft  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

RANK, ALPHA = 8, 16
LAYERS, HIDDEN, HEADS, FFN, VOCAB = 4, 256, 4, 1024, 4096
BATCH, SEQ = 4, 128
RESULTS = Path(__file__).resolve().parent / "results.md"


# --------------------------------------------------------------------------------------
# Models, inputs, the two ways to apply LoRA
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it and what PEFT must be told to match our default."""

    name: str
    build: Callable[[], nn.Module]
    peft_targets: tuple[str, ...]  # the q and v projections (GPT-2: the fused c_attn)
    fan_in_fan_out: bool            # weight stored (in, out): transformers' Conv1D
    mask: bool                      # takes attention_mask


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=512, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="sdpa"))


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
        use_cache=False, attn_implementation="sdpa"))


def _bert() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=512, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, use_cache=False, attn_implementation="sdpa"))


CASES = {
    "GPT-2": Case("GPT-2", _gpt2, ("c_attn",), True, False),
    "LLaMA": Case("LLaMA", _llama, ("q_proj", "v_proj"), False, True),
    "BERT": Case("BERT", _bert, ("query", "value"), False, True),
}


def build(case: Case) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return case.build().eval()


def batch(case: Case) -> tuple[tuple[Tensor], dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return (ids,), ({"attention_mask": torch.ones_like(ids)} if case.mask else {})


def apply_ours(case: Case, model: nn.Module) -> nn.Module:
    args, kwargs = batch(case)
    return surgery.apply_passes(model, [LoRAPass(rank=RANK, alpha=ALPHA)], example_inputs=args,
                                example_kwargs=kwargs)


def apply_peft(case: Case, model: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=list(case.peft_targets),
                             fan_in_fan_out=case.fan_in_fan_out)
    return peft.get_peft_model(model, config)


def run(model: nn.Module, case: Case) -> Tensor:
    (ids,), kwargs = batch(case)
    return model(ids, **kwargs)[0]  # logits (GPT-2, LLaMA) or last_hidden_state (BERT)


# --------------------------------------------------------------------------------------
# (a) time to apply
# --------------------------------------------------------------------------------------


def time_apply(case: Case, repeats: int) -> dict[str, float]:
    """Median seconds: ours end to end, its two halves (trace; passes on the traced model),
    and PEFT."""
    base = build(case)
    args, kwargs = batch(case)
    apply_ours(case, base)                               # warm-up: lazy imports, caches
    apply_peft(case, copy.deepcopy(base))
    times: dict[str, list[float]] = {"ours": [], "trace": [], "passes": [], "peft": []}
    for _ in range(repeats):
        fresh = copy.deepcopy(base)
        start = time.perf_counter()
        apply_peft(case, fresh)
        times["peft"].append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_ours(case, base)
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        traced = surgery.map.trace(base, args, kwargs)
        times["trace"].append(time.perf_counter() - start)
        start = time.perf_counter()
        surgery.apply_passes(traced, [LoRAPass(rank=RANK, alpha=ALPHA)])
        times["passes"].append(time.perf_counter() - start)
        del fresh, traced
        gc.collect()
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------
# (b) step time
# --------------------------------------------------------------------------------------


def _eval_step(model: nn.Module, case: Case) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            run(model, case)

    return step


def _train_step(model: nn.Module, case: Case) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        run(model, case).float().mean().backward()

    return step


def time_steps(case: Case, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds per step, ``{mode: {impl: wall seconds, impl_cpu: CPU seconds}}``, for
    modes ``eval`` and ``train``.

    Each round runs one step of every implementation, the first one rotating from round to
    round, so that a busy machine slows all of them alike. CPU time (this process's, all
    threads) is recorded beside wall-clock time: it is less disturbed by other processes.
    """
    plain = build(case)
    models = {"plain": plain, "peft": apply_peft(case, copy.deepcopy(plain)),
              "ours": apply_ours(case, plain)}
    with torch.no_grad():
        ref = run(plain, case)
        for impl in ("peft", "ours"):
            if not torch.equal(run(models[impl], case), ref):
                raise AssertionError(f"{case.name}: {impl} output differs from the plain model at init")
    out: dict[str, dict[str, float]] = {}
    for mode, make in (("eval", _eval_step), ("train", _train_step)):
        steps = {}
        for impl, model in models.items():
            model.train(mode == "train")
            steps[impl] = make(model, case)
            for _ in range(3):
                steps[impl]()                           # warm-up
        wall: dict[str, list[float]] = {impl: [] for impl in models}
        cpu: dict[str, list[float]] = {impl: [] for impl in models}
        order = list(models)
        for r in range(rounds):
            for impl in order[r % 3:] + order[:r % 3]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                steps[impl]()
                wall[impl].append(time.perf_counter() - start_wall)
                cpu[impl].append(time.process_time() - start_cpu)
        out[mode] = {impl: statistics.median(v) for impl, v in wall.items()}
        out[mode].update({f"{impl}_cpu": statistics.median(v) for impl, v in cpu.items()})
    return out


# --------------------------------------------------------------------------------------
# (c) memory, (d) parameter counts
# --------------------------------------------------------------------------------------


def _storage_bytes(model: nn.Module, exclude: set[int]) -> int:
    """Bytes of the distinct parameter and buffer storages of ``model`` not in ``exclude``."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
    return sum(seen.values())


def torch_memory(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn`` under the profiler: ``(result, peak bytes, bytes still held)``.

    Counts what torch's CPU allocator hands out and takes back while ``fn`` runs (from the
    profiler's memory events, in time order), relative to the start; "still held" is
    measured after a garbage collection, so reference cycles that ``fn`` left behind do not
    count, but they do count towards the peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        gc.collect()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return result, peak, current


def python_memory(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run ``fn`` under tracemalloc: ``(result, peak bytes, bytes still held)`` of the Python
    heap (graphs, nodes, module objects; tensor storage is not on it)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - before, current - before


def memory(case: Case) -> dict[str, dict[str, int]]:
    """Per implementation (``plain``, ``peft``, ``ours``): parameter counts, bytes added and
    held, peaks while applying and during one training step."""
    warm = build(case)
    apply_ours(case, warm)                               # warm-up: lazy imports, caches
    apply_peft(case, copy.deepcopy(warm))
    out: dict[str, dict[str, int]] = {}
    for impl in ("plain", "peft", "ours"):
        base = build(case)
        base_ptrs = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
        row: dict[str, int] = {}
        if impl == "plain":
            adapted = base
        else:
            apply = apply_peft if impl == "peft" else apply_ours
            # PEFT changes the model it is given: hand it copies, and keep ``base`` pristine.
            given = (lambda: copy.deepcopy(base)) if impl == "peft" else (lambda: base)
            first = given()
            _, row["apply_py_peak"], row["apply_py_held"] = python_memory(lambda: apply(case, first))
            second = given()
            base_ptrs = {t.untyped_storage().data_ptr() for t in [*second.parameters(), *second.buffers()]}
            adapted, row["apply_peak"], row["apply_held"] = torch_memory(lambda: apply(case, second))
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in trainable)
        row["total"] = sum(p.numel() for p in adapted.parameters())
        row["adapter_bytes"] = 0 if impl == "plain" else sum(p.numel() * p.element_size() for p in trainable)
        row["extra_bytes"] = _storage_bytes(adapted, base_ptrs)
        if impl == "peft":
            assert adapted.get_nb_trainable_parameters() == (row["trainable"], row["total"])
        adapted.train()
        step = _train_step(adapted, case)
        step()
        _, row["train_peak"], _ = torch_memory(step)
        out[impl] = row
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _ratio(a: float, b: float) -> str:
    if a == b:
        return "1.00x"
    return "n/a (PEFT: 0)" if b == 0 else f"{a / b:.2f}x"


def report(results: dict[str, dict[str, Any]], header: str) -> str:
    """The results as markdown: one table per measurement, ratios ours/PEFT."""
    lines = [header, "", f"## (a) Time to apply LoRA (r={RANK}, alpha={ALPHA}, q and v)", "",
             "Ours: `apply_passes` on the plain model, tracing by torch.export included; the "
             "trace and the passes on an already traced model are also timed alone. PEFT: "
             "`get_peft_model` on a fresh copy (the copy is not timed).", "",
             "| model | base params | ours | ours: trace | ours: passes | PEFT | ours/PEFT |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        a, m = r["apply"], r["memory"]["plain"]
        lines.append(f"| {name} | {m['total']:,d} | {_ms(a['ours'])} | {_ms(a['trace'])} | "
                     f"{_ms(a['passes'])} | {_ms(a['peft'])} | {_ratio(a['ours'], a['peft'])} |")
    lines += ["", f"## (b) Time per step, batch {BATCH} x {SEQ} tokens", "",
              "Eval: forward under `torch.no_grad()`. Train: forward + backward of the mean "
              "output, in train mode; \"plain\" then trains every weight (full fine-tuning), "
              "the adapted models only the adapters.", "",
              "Wall-clock medians; the last column is the ratio of CPU-time medians.", "",
              "| model | step | plain | PEFT | ours | ours/PEFT | PEFT/plain | ours/plain | "
              "ours/PEFT (CPU time) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for mode, t in r["steps"].items():
            label = "eval forward" if mode == "eval" else "train fwd+bwd"
            lines.append(f"| {name} | {label} | {_ms(t['plain'])} | {_ms(t['peft'])} | "
                         f"{_ms(t['ours'])} | {_ratio(t['ours'], t['peft'])} | "
                         f"{_ratio(t['peft'], t['plain'])} | {_ratio(t['ours'], t['plain'])} | "
                         f"{_ratio(t['ours_cpu'], t['peft_cpu'])} |")
    lines += ["", "## (c) Memory", "",
              "Added: bytes of the adapter parameters. Extra storage: parameter and buffer "
              "bytes the adapted model holds beyond the base model's storage. Apply peak / "
              "held: torch CPU allocator while applying, peak and what is still held after a "
              "garbage collection (profiler memory events). Python heap: the same with "
              "tracemalloc (graphs, nodes, module objects). Train step: allocator peak of one "
              "forward + backward (plain: all weights train).", "",
              "| model | | added | extra storage | apply peak | apply held | Python heap peak | "
              "Python heap held | train-step peak |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        m = r["memory"]
        for impl, label in (("ours", "ours"), ("peft", "PEFT")):
            x = m[impl]
            lines.append(f"| {name if impl == 'ours' else ''} | {label} | {x['adapter_bytes']:,d} B | "
                         f"{x['extra_bytes']:,d} B | {_mib(x['apply_peak'])} | {_mib(x['apply_held'])} | "
                         f"{_mib(x['apply_py_peak'])} | {_mib(x['apply_py_held'])} | "
                         f"{_mib(x['train_peak'])} |")
        o, p = m["ours"], m["peft"]
        lines.append(f"| | ours/PEFT | {_ratio(o['adapter_bytes'], p['adapter_bytes'])} | "
                     f"{_ratio(o['extra_bytes'], p['extra_bytes'])} | "
                     f"{_ratio(o['apply_peak'], p['apply_peak'])} | "
                     f"{_ratio(o['apply_held'], p['apply_held'])} | "
                     f"{_ratio(o['apply_py_peak'], p['apply_py_peak'])} | "
                     f"{_ratio(o['apply_py_held'], p['apply_py_held'])} | "
                     f"{_ratio(o['train_peak'], p['train_peak'])} |")
        lines.append(f"| | plain | | | | | | | {_mib(m['plain']['train_peak'])} |")
    lines += ["", "## (d) Parameter counts", "",
              "| model | ours trainable / total | PEFT trainable / total | equal |",
              "|---|---:|---:|---|"]
    for name, r in results.items():
        o, p = r["memory"]["ours"], r["memory"]["peft"]
        same = (o["trainable"], o["total"]) == (p["trainable"], p["total"])
        lines.append(f"| {name} | {o['trainable']:,d} / {o['total']:,d} | {p['trainable']:,d} / "
                     f"{p['total']:,d} | {'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    repeats, rounds = (2, 5) if args.quick else (5, 21)
    threads = torch.get_num_threads()
    header = (
        f"# fx-surgery vs PEFT: LoRA r={RANK}, alpha={ALPHA} on q and v\n\n"
        f"Configs: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, feed-forward {FFN}, vocab "
        f"{VOCAB}, random weights, float32, CPU.  \n"
        f"Run {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__} ({threads} thread{'s' if threads != 1 else ''}), transformers "
        f"{transformers.__version__}, peft {peft.__version__}, Python "
        f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f}.  \n"
        f"Apply: median of {repeats}; steps: median of {rounds} interleaved rounds.")
    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        case = CASES[name]
        print(f"[{name}] parameter counts and memory ...", file=sys.stderr)
        mem = memory(case)
        print(f"[{name}] time to apply ...", file=sys.stderr)
        applied = time_apply(case, repeats)
        print(f"[{name}] step times ...", file=sys.stderr)
        steps = time_steps(case, rounds)
        results[name] = {"memory": mem, "apply": applied, "steps": steps}
    text = report(results, header + f" Load average at the end {os.getloadavg()[0]:.1f}.")
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"written to {RESULTS.parent.name}/{RESULTS.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

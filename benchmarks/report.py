"""The results as markdown: a summary against the targets, then one table per measurement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cases import ALPHA, BATCH, PREFIX, RANK, SEQ, WAYS
from contenders import Contenders
from memory import ApplyMemory
from timing import Timing

# The ways that adapt a model (the others time or measure a part of that work).
APPLY_WAYS = ("lora_pattern", "lora_role", "prefix")


@dataclass
class Results:
    """Everything one run measured, by case name."""

    apply: dict[str, dict[str, Timing]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    map_frontend: dict[str, str] = field(default_factory=dict)
    memory: dict[str, dict[str, ApplyMemory]] = field(default_factory=dict)
    steps: dict[str, dict[str, dict[str, Timing]]] = field(default_factory=dict)
    contenders: dict[str, Contenders] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _kib(n: int) -> str:
    return f"{n / 2**10:,.0f} KiB" if abs(n) < 2**20 else f"{n / 2**20:.2f} MiB"


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _step_verdict(ratio: float, aa: float) -> str:
    """Met when ``ratio <= 1``; a miss smaller than the A/A control's distance from 1 is
    said to be within noise."""
    if ratio <= 1.0:
        return "met"
    return "missed, within noise (A/A)" if ratio - 1.0 <= abs(aa - 1.0) else "**missed**"


# --------------------------------------------------------------------------- summary


def summary(r: Results) -> list[str]:
    """One row per target: the measured value and whether it meets the target."""
    rows = ["| target | measured | |", "|---|---|---|"]
    for name, t in r.apply.items():
        if name.endswith("-4") and "lora_pattern" in t and "peft_lora" in t:
            ratio = t["lora_pattern"].wall / t["peft_lora"].wall
            rows.append(f"| apply LoRA by pattern <= 2x `get_peft_model`, {name} | "
                        f"{_t(t['lora_pattern'].wall)} vs {_t(t['peft_lora'].wall)}: "
                        f"{ratio:.1f}x | {_verdict(ratio <= 2)} |")
    for name, t in r.apply.items():
        if not name.endswith("-4") and "lora_pattern" in t and "peft_lora" in t:
            ratio = t["lora_pattern"].wall / t["peft_lora"].wall
            rows.append(f"| apply LoRA by pattern <= 2x `get_peft_model`, {name} | "
                        f"{_t(t['lora_pattern'].wall)} vs {_t(t['peft_lora'].wall)}: "
                        f"{ratio:.1f}x | {_verdict(ratio <= 2)} |")
    deepest = [n for n in r.apply if n.startswith("LLaMA")]
    if deepest:
        name = max(deepest, key=lambda n: int(n.split("-")[1]))
        t = r.apply[name].get("lora_role")
        if t is None:
            rows.append(f"| apply LoRA by role well under 1 s, {name} | not measured: "
                        f"{r.failures[name].get('lora_role', '')} | |")
        else:
            rows.append(f"| apply LoRA by role well under 1 s (read: < 0.5 s), {name} | {_t(t.wall)} | "
                        f"{_verdict(t.wall < 0.5)} |")
    applying = [(n, w, m) for n, ms in r.memory.items() for w, m in ms.items()
                if w in APPLY_WAYS]
    if applying:
        mult, name, way = max((m.multiple, n, w) for n, w, m in applying)
        rows.append(f"| peak memory while applying <= 1.1x the weight bytes (worst of ours: "
                    f"LoRA by pattern or role, prefix) | {mult:.3f}x ({name}, {WAYS[way].label}) "
                    f"| {_verdict(mult <= 1.1)} |")
        heap, name, way = max((m.multiple_with_heap, n, w) for n, w, m in applying)
        rows.append(f"| the same, adding the Python heap's peak | {heap:.3f}x ({name}, "
                    f"{WAYS[way].label}) | {_verdict(heap <= 1.1)} |")
    maps = [(m.multiple_with_heap, n) for n, ms in r.memory.items() for w, m in ms.items()
            if w == "trace"]
    if maps:
        heap, name = max(maps)
        rows.append(f"| for reference, the whole map alone (`surgery.trace`, not part of "
                    f"applying by pattern or role), adding the Python heap's peak | "
                    f"{heap:.3f}x ({name}) | |")
    for name, s in r.steps.items():
        for mode, label in (("eval", "forward (eval, no_grad)"), ("train", "train step")):
            t = s[mode]
            cpu = t["ours"].cpu / t["peft"].cpu
            wall = t["ours"].wall / t["peft"].wall
            aa = t["plain_again"].cpu / t["plain"].cpu
            rows.append(f"| {label} <= 1.00x PEFT, {name} | {cpu:.2f}x CPU time, {wall:.2f}x "
                        f"wall (A/A control: {aa:.2f}x) | {_step_verdict(cpu, aa)} |")
    for name, s in r.steps.items():
        t = s["eval"]
        if "merged" in t:
            cpu = t["merged"].cpu / t["plain"].cpu
            wall = t["merged"].wall / t["plain"].wall
            aa = t["plain_again"].cpu / t["plain"].cpu
            rows.append(f"| merged forward = plain base, {name} | {cpu:.2f}x CPU time, "
                        f"{wall:.2f}x wall (A/A control: {aa:.2f}x) | {_step_verdict(cpu, aa)} |")
        else:
            rows.append(f"| merged forward = plain base, {name} | not measured: "
                        f"{r.contenders[name].merge_failure} | |")
    for name, k in r.contenders.items():
        rows.append(f"| trainable / total parameters = PEFT's, {name} | "
                    f"{k.counts['ours'][0]:,d} / {k.counts['ours'][1]:,d} | met (asserted) |")
    return rows


# --------------------------------------------------------------------------- sections


def apply_tables(r: Results) -> list[str]:
    lines = ["## (a) Time to apply", "",
             (f"LoRA r={RANK}, alpha={ALPHA} on the query and value projections (GPT-2: the "
             f"fused `c_attn`). Ours by pattern: `LoRAPass(pattern=[...])`, no example inputs. "
             f"PEFT: `get_peft_model` on a fresh copy of the model (the copy, which PEFT needs "
             f"because it changes the model it is given, is not timed; ours leaves the "
             f"model alone). Medians of interleaved rounds; CPU time in brackets."), "",
             ("The weight-sharing copy of the model that every `apply_passes` starts with "
             "(`surgery.sites.params.share_weights_copy`) is timed alone as well."), "",
             ("| model | base params | ours: by pattern | of which the copy | PEFT | "
             "ours/PEFT (wall) | ours/PEFT (CPU) |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in r.apply.items():
        if "lora_pattern" not in t or "peft_lora" not in t:
            continue
        o, p = t["lora_pattern"], t["peft_lora"]
        cp = _t(t["copy"].wall) if "copy" in t else "-"
        lines.append(f"| {name} | {r.params[name]:,d} | {_t(o.wall)} ({_t(o.cpu)}) | {cp} | "
                     f"{_t(p.wall)} ({_t(p.cpu)}) | {_x(o.wall, p.wall)} | {_x(o.cpu, p.cpu)} |")
    llama = [n for n in r.apply if n.startswith("LLaMA")]
    if not llama:
        return lines
    lines += ["", ("Ways that need the map, on LLaMA (width 256) at several depths. By role: "
              "`LoRAPass(role=[\"query\", \"value\"])` with `example_inputs=` (the batch of "
              f"{BATCH} x {SEQ} tokens and its mask). Roles alone: "
              "`surgery.targets.model_roles(model, example_inputs)`. Map alone: "
              "`surgery.trace(model, example_inputs)` (front end in brackets). Prefix: "
              f"`PrefixPass(length={PREFIX})`, against PEFT's `PrefixTuningConfig("
              f"num_virtual_tokens={PREFIX})`. Wall-clock medians; ratios to PEFT's LoRA "
              "(prefix: to PEFT's prefix tuning)."), "",
              ("| model | ours: by role | ours: roles alone | ours: map alone | ours: prefix | "
              "PEFT: prefix | by role / PEFT LoRA | prefix / PEFT prefix |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(name: str, way: str) -> str:
        t = r.apply[name].get(way)
        return _t(t.wall) if t else "not measured"

    for name in llama:
        t = r.apply[name]
        role = _x(t["lora_role"].wall, t["peft_lora"].wall) if "lora_role" in t else "n/a"
        pre = (_x(t["prefix"].wall, t["peft_prefix"].wall)
               if "prefix" in t and "peft_prefix" in t else "n/a")
        lines.append(f"| {name} | {cell(name, 'lora_role')} | {cell(name, 'roles')} | "
                     f"{cell(name, 'trace')} ({r.map_frontend.get(name, '?')}) | "
                     f"{cell(name, 'prefix')} | {cell(name, 'peft_prefix')} | {role} | {pre} |")
    failed = [(n, w, e) for n, f in r.failures.items() for w, e in f.items()]
    if failed:
        lines += ["", "Not measured (failed in the warm-up run):", ""]
        lines += [f"- {n}, {WAYS[w].label}: `{e}`" for n, w, e in failed]
    return lines


def memory_table(r: Results) -> list[str]:
    lines = ["## (b) Memory while applying", "",
             ("Only new storage counts. Allocator: torch's CPU allocator, from the profiler's "
             "memory events, relative to the start; peak while applying and what the adapted "
             "model still holds after a garbage collection. Python heap: the same with "
             "tracemalloc (module objects, graphs, nodes). Multiple: (weights + allocator "
             "peak) / weights; with heap: adding the Python heap's peak too (an upper bound, "
             "the two peaks come from separate runs). Target: <= 1.1x."), "",
             ("| model | way | weights | allocator peak | allocator held | Python heap peak | "
             "Python heap held | multiple | with heap |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ms in r.memory.items():
        for i, (way, m) in enumerate(ms.items()):
            lines.append(f"| {name if i == 0 else ''} | {WAYS[way].label} | "
                         f"{_kib(m.weights) if i == 0 else ''} | {_kib(m.peak)} | {_kib(m.held)} | "
                         f"{_kib(m.py_peak)} | {_kib(m.py_held)} | {m.multiple:.3f}x | "
                         f"{m.multiple_with_heap:.3f}x |")
    return lines


def step_table(r: Results, rounds: int) -> list[str]:
    lines = ["## (c) Time per step", "",
             (f"Batch {BATCH} x {SEQ} tokens. Forward: eval mode under `torch.no_grad()`. Train "
             "step: forward, the model's own loss (`labels=`; BERT: mean of the last hidden "
             "state), backward, `AdamW.step()` over the trainable parameters, in train mode; "
             "\"plain\" then trains every weight (full fine-tuning). Ours: LoRA by pattern; "
             "merged: `apply_passes(ours, [MergeLoRAPass()])`. A/A: a second, identical plain "
             "model timed in the same rounds; its ratio to the first shows how far the "
             "machine's noise alone moves a ratio. "
             f"Medians of {rounds} interleaved rounds, wall clock; ratios of CPU-time "
             "medians in the last columns."), "",
             ("| model | step | plain | PEFT | ours | merged | ours/PEFT | ours/plain | "
             "merged/plain | A/A | ours/PEFT (CPU) | merged/plain (CPU) | A/A (CPU) |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r.steps.items():
        for mode, label in (("eval", "forward"), ("train", "train step")):
            t = s[mode]
            m, a = t.get("merged"), t["plain_again"]
            lines.append(
                f"| {name} | {label} | {_t(t['plain'].wall)} | {_t(t['peft'].wall)} | "
                f"{_t(t['ours'].wall)} | {_t(m.wall) if m else '-'} | "
                f"{_x(t['ours'].wall, t['peft'].wall)} | {_x(t['ours'].wall, t['plain'].wall)} | "
                f"{_x(m.wall, t['plain'].wall) if m else '-'} | {_x(a.wall, t['plain'].wall)} | "
                f"{_x(t['ours'].cpu, t['peft'].cpu)} | {_x(m.cpu, t['plain'].cpu) if m else '-'} | "
                f"{_x(a.cpu, t['plain'].cpu)} |")
    return lines


def checks_table(r: Results) -> list[str]:
    lines = ["## (d) Parameter counts and checks", "",
             ("Asserted before timing: both adapted models reproduce the plain model's output "
             "bitwise at init, and trainable / total counts equal PEFT's "
             "`get_nb_trainable_parameters()`. Then both get the same adapter weights (B "
             "random, not zero): largest difference of outputs ours vs PEFT, and merged vs "
             "ours."), "",
             ("| model | ours trainable / total | PEFT trainable / total | max \\|ours - PEFT\\| | "
             "max \\|merged - ours\\| |"), "|---|---:|---:|---:|---:|"]
    for name, k in r.contenders.items():
        o, p = k.counts["ours"], k.counts["peft"]
        merged = f"{k.diff_merged:.1e}" if k.diff_merged is not None else "not measured"
        lines.append(f"| {name} | {o[0]:,d} / {o[1]:,d} | {p[0]:,d} / {p[1]:,d} | "
                     f"{k.diff_peft:.1e} | {merged} |")
    lines += [""] + [f"- {name}: {note}" for name, k in r.contenders.items() for note in k.notes]
    return lines


def render(r: Results, header: list[str], rounds: int, notes: list[str]) -> str:
    """The whole report."""
    parts: list[Any] = [header, ["## Against the targets", "",
                                 ("Step-time targets are judged on CPU time (one thread; "
                                 "other processes disturb it less than wall-clock time), "
                                 "met when the ratio is at most the target; the A/A control (a second plain "
                                 "model against the first, same rounds) shows how far noise "
                                 "alone moves a ratio, and a miss smaller than that is marked "
                                 "as within noise."), ""],
                        summary(r), notes, apply_tables(r), memory_table(r),
                        step_table(r, rounds), checks_table(r)]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"

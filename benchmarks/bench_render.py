"""How long the default before/after diagrams of a deep transformer take.

transformers LLaMA configurations with random weights (hidden 256, feed-forward 512, 4
heads, 2 key/value heads, vocab 256), LoRA on ``q_proj`` and ``v_proj`` of every layer by
pattern, then ``render_diff(model, adapted, out_dir, example_inputs=(ids,))`` with default
options, timed from a freshly adapted model (nothing traced yet), whole: tracing, graphs,
diff, DOT, Graphviz layout of both diagrams, Markdown and HTML. The same with LoRA on the
first half of the layers only (drawn as two ranges), and, with ``--uncollapsed``, with
every layer drawn (``RenderOptions(repeats=False)``; the node budget then keeps Graphviz
from running, and the time is what is left).

::

    python benchmarks/bench_render.py                  # 2, 8, 24 and 48 layers
    python benchmarks/bench_render.py --layers 24 48 --rounds 3 --uncollapsed

Not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed beside them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import LoRAPass, apply_passes  # noqa: E402
from visualize import LayoutSkippedWarning, RenderOptions, render_diff  # noqa: E402


def llama(layers: int) -> torch.nn.Module:
    """A transformers ``LlamaForCausalLM`` with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, num_hidden_layers=layers)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _count_nodes(dot: Path) -> int:
    """Node statements of a DOT file written by :func:`visualize.to_dot` (legend excluded)."""
    return sum(1 for line in dot.read_text(encoding="utf-8").splitlines()
               if line.lstrip().startswith('"') and " [label=" in line and " -> " not in line
               and not line.lstrip().startswith('"legend:'))


def one_round(layers: int, pattern: list[str], options: RenderOptions) -> dict:
    """Adapt a fresh model and time ``render_diff`` on it."""
    model = llama(layers)
    ids = torch.arange(32).reshape(2, 16) % 256
    adapted = apply_passes(model, [LoRAPass(pattern=pattern)], example_inputs=(ids,))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        report = render_diff(model, adapted, tmp, example_inputs=(ids,), options=options)
        seconds = time.perf_counter() - start
        out = Path(tmp)
        row = {
            "seconds": seconds,
            "before_nodes": _count_nodes(out / "before.dot"),
            "after_nodes": _count_nodes(out / "after.dot"),
            "svgs": sum(1 for p in report.files if p.suffix == ".svg"),
            "added": len(report.added),
            "nodes_added": len(report.nodes_added),
            "skipped": any(issubclass(w.category, LayoutSkippedWarning) for w in caught),
            "ranges": sorted({line.split('label="')[1].split(" · ")[0] for line in
                              (out / "after.dot").read_text("utf-8").splitlines()
                              if "graph [label=" in line and "×" in line}),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 48])
    parser.add_argument("--rounds", type=int, default=1, help="rounds per case (median shown)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--uncollapsed", action="store_true",
                        help="also time RenderOptions(repeats=False) (every layer drawn)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [("all layers", None, RenderOptions()),
             ("first half", "half", RenderOptions())]
    if args.uncollapsed:
        cases.append(("all layers, repeats=False", None, RenderOptions(repeats=False)))
    one_round(2, ["q_proj", "v_proj"], RenderOptions())  # imports and first-call costs
    print(f"{'layers':>6}  {'case':<26} {'seconds':>8}  {'nodes before/after':>18}  svgs  "
          f"{'params added':>12}  {'nodes added':>11}  drawn as")
    for layers in args.layers:
        for name, which, options in cases:
            if which == "half":
                pattern = [f"re:.*layers\\.({'|'.join(str(i) for i in range(layers // 2))})\\."
                           f"self_attn\\.(q|v)_proj"]
            else:
                pattern = ["q_proj", "v_proj"]
            rows = [one_round(layers, pattern, options) for _ in range(args.rounds)]
            seconds = statistics.median(r["seconds"] for r in rows)
            r = rows[0]
            nodes = f"{r['before_nodes']}/{r['after_nodes']}"
            svgs = f"{r['svgs']}" + (" (budget)" if r["skipped"] else "")
            print(f"{layers:>6}  {name:<26} {seconds:>8.2f}  {nodes:>18}  {svgs:<4}  "
                  f"{r['added']:>12}  {r['nodes_added']:>11}  {'; '.join(r['ranges']) or '-'}",
                  flush=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

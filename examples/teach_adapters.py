"""Houlsby (serial) and parallel bottleneck adapters on the same block, drawn side by side.

A bottleneck adapter is ``up(act(down(h)))``: ``down`` maps ``d → m``, ``up`` maps ``m → d``
with ``up`` zero at init, so the model is unchanged until it trains. The two placements
differ only in what the adapter reads:

- **serial** (Houlsby et al. 2019, ``SerialAdapterPass``): after the sub-layer, on its
  output: ``h = mlp(x);  h + up(act(down(h)))``;
- **parallel** (He et al. 2022, ``ParallelAdapterPass``): beside the sub-layer, on its
  input: ``mlp(x) + s · up(act(down(x)))``.

Both are put on ``layers.0.mlp`` of the built-in transformer with the same bottleneck
``m``; the script prints where each reads from and adds to, the parameter counts (equal:
``(d·m + m) + (m·d + d)``), the identity at init, and draws each adapted block
(``serial.svg``, ``parallel.svg``) and both close-ups in one picture (``side_by_side.svg``).

Run::

    python examples/teach_adapters.py [--bottleneck 8] [--out out/teach_adapters]

Without ``--out`` the pictures (SVG and their DOT sources) go to a temporary folder that is
removed at exit. ``examples/images/teach_adapters.svg`` is ``side_by_side.svg``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import networkx as nx
import torch
from teach_common import close_up, inserted_nodes, max_abs_diff, output_folder

import surgery
from surgery import ParallelAdapterPass, RenderOptions, SerialAdapterPass
from visualize import render, to_networkx

SITE = "layers.0.mlp"
D_MODEL = 64
TITLES = {"serial": "serial (Houlsby 2019)", "parallel": "parallel (He et al 2022)"}


def reads_and_adds(graph: nx.DiGraph, pass_name: str) -> tuple[str, str]:
    """``(label of what the adapter's down projection reads, labels of the final add's
    other input)`` for the adapter a pass inserted."""
    nodes = inserted_nodes(graph, pass_name)
    part = {graph.nodes[n]["provenance"]["part"]: n for n in nodes}
    (source,) = graph.predecessors(part["down"])
    add = part["add"]
    other = [p for p in graph.predecessors(add) if p not in nodes]
    label = lambda n: str(graph.nodes[n]["label"]).split(":")[0]  # noqa: E731
    return label(source), ", ".join(label(n) for n in other)


def side_by_side(graphs: dict[str, nx.DiGraph]) -> nx.DiGraph:
    """One graph holding a copy of each close-up, each in its own cluster named by its key."""
    joined = nx.DiGraph()
    for index, (title, graph) in enumerate(graphs.items()):
        for node, attrs in graph.nodes(data=True):  # drawn in the order of ``graphs``
            joined.add_node(f"{title}|{node}", **{**attrs, "cluster": title,
                                                  "order": index * 100_000 + attrs.get("order", 0)})
        for u, v, attrs in graph.edges(data=True):
            joined.add_edge(f"{title}|{u}", f"{title}|{v}", **attrs)
    first = next(iter(graphs.values()))
    joined.graph.update(first.graph)
    joined.graph.pop("repeats", None)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bottleneck", type=int, default=8, help="bottleneck width m (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.load_model("builtin")
    model = spec.model
    (input_ids,) = spec.example_inputs
    m = args.bottleneck
    with torch.no_grad():
        base_logits = model(input_ids)
    print(spec.description)
    print(f"adapter site: {SITE} (d = {D_MODEL}), bottleneck m = {m}")

    passes = {
        "serial": SerialAdapterPass(pattern=SITE, bottleneck=m),
        "parallel": ParallelAdapterPass(pattern=SITE, bottleneck=m),
    }
    close_ups: dict[str, nx.DiGraph] = {}
    counts: dict[str, int] = {}
    with output_folder(args.out) as out:
        for kind, step in passes.items():
            adapted = surgery.apply_passes(model, [step], example_inputs=spec.example_inputs)
            graph = to_networkx(adapted)
            reads, adds_to = reads_and_adds(graph, step.name)
            parts = [graph.nodes[n]["provenance"]["part"] for n in inserted_nodes(graph, step.name)]
            counts[kind] = sum(p.numel() for p in surgery.trainable_parameters(adapted))
            with torch.no_grad():
                delta = max_abs_diff(adapted(input_ids), base_logits)
            print(f"\n{kind} ({step.name}):")
            print("  path: " + " -> ".join(parts) + f" (activation {step.activation})")
            print(f"  reads: {reads}; adds to: {adds_to}")
            print(f"  trainable: {counts[kind]:,d} = down {D_MODEL}x{m}+{m} + up {m}x{D_MODEL}"
                  f"+{D_MODEL}")
            print(f"  identity at init: max|Δ| = {delta}")
            if delta != 0.0:
                print(f"FAILED: the {kind} adapter changed the outputs at init")
                return 1
            render(adapted, out / f"{kind}.svg", options=RenderOptions(depth=3))
            block = [n for n, a in graph.nodes(data=True) if a.get("cluster") == SITE]
            close_ups[TITLES[kind]] = close_up(graph, inserted_nodes(graph, step.name) + block)

        print(f"\nparameter counts equal: {counts['serial'] == counts['parallel']} "
              f"({counts['serial']:,d} each)")
        render(side_by_side(close_ups), out / "side_by_side.svg",
               options=RenderOptions(title=f"bottleneck adapters on {SITE}, m = {m}: "
                                     "serial (Houlsby) reads the output, parallel the input"))
        print(f"pictures: {', '.join(sorted(p.name for p in out.glob('*.svg')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

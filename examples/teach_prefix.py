"""Prefix tuning on attention: extra learned keys and values enter the attention op.

Prefix tuning (Li & Liang 2021) prepends ``P`` learned key and value vectors, per head, to
the keys and values of an attention op, so every query can attend to them:
``K' = cat(P_k, K)``, ``V' = cat(P_v, V)`` along the sequence axis, and the mask gets ``P``
leading columns every query sees. The model's own weights stay frozen.

On ``layers.0.attn`` of the built-in transformer (4 heads, head size 16) the script shows:

- where the prefix enters: the ``cat`` nodes that feed the attention op's key and value
  inputs, and the key's shape before and after (``2×4×16×16 → 2×4×(P+16)×16``);
- the prefix length ``P`` and its parameter count, ``2 · heads · P · head_dim``;
- that a plain prefix changes the outputs at init (it joins the softmax), and that the
  zero-initialised gate (``gate="zero"``, LLaMA-Adapter) keeps them bitwise equal;
- the whole adapted model (``prefix.svg``) and a close-up of the attention op
  (``prefix_site.svg``).

Run::

    python examples/teach_prefix.py [--length 4] [--out out/teach_prefix]

Without ``--out`` the pictures (SVG and their DOT sources) go to a temporary folder that is
removed at exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import networkx as nx
import torch
from teach_common import close_up, inserted_nodes, max_abs_diff, output_folder

import surgery
from surgery import PrefixPass, RenderOptions
from visualize import render, to_networkx
from visualize.dot import format_shape

SITE = "layers.0.attn"


def attention_inputs(graph: nx.DiGraph) -> dict[str, str]:
    """``{part: shape text}`` of the prefix's ``cat`` nodes and what feeds them."""
    found = {}
    for node in inserted_nodes(graph, "prefix"):
        part = graph.nodes[node]["provenance"]["part"]
        if not part.startswith("cat_"):
            continue
        base = [p for p in graph.predecessors(node) if not graph.nodes[p].get("pass_name")]
        (into,) = graph.successors(node)
        found[part] = (f"{format_shape(graph.edges[base[0], node].get('shape'))} -> "
                       f"{format_shape(graph.nodes[node].get('shape'))} into "
                       f"{graph.nodes[into]['label']}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4, help="prefix length P (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.load_model("builtin")
    model = spec.model
    (input_ids,) = spec.example_inputs
    with torch.no_grad():
        base_logits = model(input_ids)
    print(spec.description)

    adapted = surgery.apply_passes(model, [PrefixPass(length=args.length, pattern=SITE)],
                                   example_inputs=spec.example_inputs)
    graph = to_networkx(adapted)
    named = dict(surgery.named_trainable_parameters(adapted))
    print(f"\nprefix on {SITE}: length P = {args.length}")
    for name, param in named.items():
        print(f"  {name}: {format_shape(tuple(param.shape))}")
    count = sum(p.numel() for p in named.values())
    print(f"prefix parameters: {count:,d} = 2 (key, value) x 4 heads x {args.length} x 16")
    for part, text in sorted(attention_inputs(graph).items()):
        print(f"  {part}: {text}")
    with torch.no_grad():
        delta = max_abs_diff(adapted(input_ids), base_logits)
    print(f"plain prefix at init: max|Δ| = {delta:.3g} (the prefix joins the softmax)")

    gated = surgery.apply_passes(model, [PrefixPass(length=args.length, pattern=SITE, gate="zero")],
                                 example_inputs=spec.example_inputs)
    with torch.no_grad():
        gated_delta = max_abs_diff(gated(input_ids), base_logits)
    print(f"zero-gated prefix at init: max|Δ| = {gated_delta}")
    if gated_delta != 0.0:
        print("FAILED: the zero gate did not keep the outputs at init")
        return 1

    with output_folder(args.out) as out:
        render(adapted, out / "prefix.svg", options=RenderOptions(depth=3))
        render(close_up(graph, inserted_nodes(graph, "prefix")), out / "prefix_site.svg",
               options=RenderOptions(title=f"prefix tuning on {SITE}: P = {args.length} extra "
                                     "keys and values"))
        print(f"pictures: {', '.join(sorted(p.name for p in out.glob('*.svg')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merging adapters into the weights, and taking them out again, drawn before and after.

After training, LoRA's side path can be folded into the layer it adapts,
``W ← W + (alpha / r) · B A``, and an IA³ vector ``l`` scaling a layer's output into its
rows, ``W ← diag(l) W`` (``b ← l ⊙ b``): the merged model runs as fast as the base model,
with no extra nodes. Unmerge puts the adapters back and restores every base weight bit for
bit (the weights before the merge are kept, not recomputed).

The script adapts the built-in transformer with LoRA on the query and value projections and
IA³ on keys and values, perturbs the adapters as a few training steps would, then:

- draws the adapted model (``adapted.svg``: LoRA and IA³ nodes in their pass colours);
- merges both, draws the merged model (``merged.svg``: no adapter nodes; the layers whose
  weights were rewritten drawn in the "rewritten weights" colour) and prints max|Δ| of the
  outputs (float32 rounding, not zero: the sums are done in another order);
- unmerges, checks every base weight and the outputs bitwise, and draws it (``unmerged.svg``).

Run::

    python examples/teach_merge.py [--out out/teach_merge]

Without ``--out`` the pictures (SVG and their DOT sources) go to a temporary folder that is
removed at exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from teach_common import inserted_nodes, max_abs_diff, output_folder

import surgery
from surgery import (
    IA3Pass,
    LoRAPass,
    MergeIA3Pass,
    MergeLoRAPass,
    RenderOptions,
    UnmergeIA3Pass,
    UnmergeLoRAPass,
)
from visualize import render, to_networkx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.load_model("builtin")
    model = spec.model
    (input_ids,) = spec.example_inputs
    print(spec.description)

    adapted = surgery.apply_passes(
        model, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8),
                IA3Pass(pattern=["k_proj", "v_proj"])],
        example_inputs=spec.example_inputs)
    with torch.no_grad():  # stand-in for training: move every adapter away from its init
        for param in surgery.trainable_parameters(adapted):
            param.add_(0.05 * torch.randn_like(param))
        adapted_logits = adapted(input_ids)
        moved = max_abs_diff(adapted_logits, model(input_ids))
    graph = to_networkx(adapted)
    print(f"adapted: {len(inserted_nodes(graph, 'lora'))} LoRA nodes, "
          f"{len(inserted_nodes(graph, 'ia3'))} IA3 nodes; outputs moved by the adapters: "
          f"max|Δ| = {moved:.3g}")

    merged = surgery.apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()])
    merged_graph = to_networkx(merged)
    rewritten = sorted(a["module"] for _, a in merged_graph.nodes(data=True) if a.get("rewritten"))
    with torch.no_grad():
        merge_delta = max_abs_diff(merged(input_ids), adapted_logits)
    print(f"merged: {len(inserted_nodes(merged_graph))} adapter nodes left; weights rewritten "
          f"in {len(rewritten)} layers: {', '.join(rewritten)}")
    print(f"merged vs adapted outputs: max|Δ| = {merge_delta:.2e} (float32 rounding)")
    if not merge_delta < 1e-4:
        print("FAILED: the merged model does not compute what the adapted one did")
        return 1

    unmerged = surgery.apply_passes(merged, [UnmergeIA3Pass(), UnmergeLoRAPass()])
    base = dict(model.named_parameters())
    exact = sum(torch.equal(p, base[n]) for n, p in unmerged.named_parameters() if n in base)
    with torch.no_grad():
        unmerge_delta = max_abs_diff(unmerged(input_ids), adapted_logits)
    print(f"unmerge exact: base weights bitwise equal: {exact == len(base)} "
          f"({exact}/{len(base)} tensors); outputs vs adapted: max|Δ| = {unmerge_delta}")
    if exact != len(base) or unmerge_delta != 0.0:
        print("FAILED: unmerge did not restore the model exactly")
        return 1

    with output_folder(args.out) as out:
        picture = RenderOptions(depth=3)
        render(adapted, out / "adapted.svg", options=picture)
        render(merged, out / "merged.svg", options=picture)
        render(unmerged, out / "unmerged.svg", options=picture)
        print(f"pictures: {', '.join(sorted(p.name for p in out.glob('*.svg')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

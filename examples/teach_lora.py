"""LoRA step by step on the built-in 2-layer transformer, with a picture at every step.

LoRA (Hu et al. 2021) leaves a linear layer's weight ``W`` frozen and adds a low-rank side
path beside it: ``y = W x + (alpha / r) · B A x``, with ``A`` (``r × d_in``) Kaiming-uniform
and ``B`` (``d_out × r``) zero at init, so the model is unchanged until ``B`` trains.

1. the base model (``1_base.svg``);
2. LoRA on one layer, ``layers.0.attn.q_proj`` (``2_lora_one_layer.svg``, and a close-up
   of the site, ``2_lora_site.svg``): the side path lora_A → lora_B → scale → add;
3. LoRA on every attention projection (``3_lora_attention.svg``; both blocks are identical,
   so the block is drawn once, marked ×2);
4. identity at init: the logits are bitwise equal, max|Δ| = 0;
5. a few training steps: only lora_A / lora_B change;
6. merge: ``W ← W + (alpha / r) · B A``; the side path is gone and the merged weights are
   drawn as rewritten (``4_merged.svg``); outputs agree within float rounding;
7. unmerge: the side path comes back and every base weight is restored bit for bit.

Run::

    python examples/teach_lora.py [--steps 5] [--out out/teach_lora]

Without ``--out`` the pictures (SVG and their DOT sources) go to a temporary folder that is
removed at exit. ``examples/images/teach_lora_site.svg`` is ``2_lora_site.svg``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import networkx as nx
import torch
import torch.nn.functional as F
from teach_common import close_up, inserted_nodes, max_abs_diff, output_folder

import surgery
from surgery import LoRAPass, MergeLoRAPass, RenderOptions, UnmergeLoRAPass
from visualize import render, to_networkx

SITE = "layers.0.attn.q_proj"


def side_path(graph: nx.DiGraph, site: str) -> list[str]:
    """The parts of the LoRA side path at ``site``, in dataflow order (``lora_A``, ...)."""
    nodes = [n for n in inserted_nodes(graph, "lora") if graph.nodes[n]["provenance"]["site"] == site]
    return [graph.nodes[n]["provenance"]["part"] for n in nodes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pictures")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.load_model("builtin")
    model = spec.model
    (input_ids,) = spec.example_inputs                                   # int64 (2, 16)
    total = sum(p.numel() for p in model.parameters())
    print(spec.description)
    print(f"base model: {total:,d} parameters")
    picture = RenderOptions(depth=3)

    with output_folder(args.out) as out:
        render(model, out / "1_base.svg", options=picture)

        # 2. One layer.
        r, alpha = args.rank, 2 * args.rank
        one = surgery.apply_passes(model, [LoRAPass(pattern=SITE, rank=r, alpha=alpha)],
                                   example_inputs=spec.example_inputs)
        graph = to_networkx(one)
        parts = side_path(graph, SITE)
        lora_params = sum(p.numel() for p in surgery.trainable_parameters(one))
        print(f"\nLoRA on {SITE} (r={r}, alpha={alpha}, scaling alpha/r={alpha / r:g})")
        print("side path: " + " -> ".join(parts))
        print(f"trainable on one layer: {lora_params:,d} = A {r}x64 + B 64x{r}")
        render(one, out / "2_lora_one_layer.svg", options=picture)
        render(close_up(graph, inserted_nodes(graph, "lora")), out / "2_lora_site.svg",
               options=RenderOptions(title=f"LoRA on {SITE}: y = W x + (alpha/r) · B A x"))

        # 3. Every attention projection.
        adapted = surgery.apply_passes(model, [LoRAPass(pattern="attn.*", rank=r, alpha=alpha)],
                                       example_inputs=spec.example_inputs)
        every = to_networkx(adapted)
        sites = {every.nodes[n]["provenance"]["site"] for n in inserted_nodes(every, "lora")}
        trainable = sum(p.numel() for p in surgery.trainable_parameters(adapted))
        print(f"\nLoRA on every attention projection: {len(sites)} sites")
        print(f"trainable: {trainable:,d} of {total + trainable:,d} "
              f"({100 * trainable / (total + trainable):.2f}%)")
        render(adapted, out / "3_lora_attention.svg", options=picture)

        # 4. Identity at init: B = 0.
        with torch.no_grad():
            base_logits = model(input_ids)
            delta = max_abs_diff(adapted(input_ids), base_logits)
        print(f"\nidentity at init: max|Δ| = {delta}")
        if delta != 0.0:
            print("FAILED: LoRA changed the outputs at init")
            return 1

        # 5. Train the adapters on a toy next-token task.
        optimizer = torch.optim.AdamW(surgery.trainable_parameters(adapted), lr=1e-2)
        losses = []
        for step in range(1, args.steps + 1):
            logits = adapted(input_ids)                                  # (2, 16, 256)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   input_ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"step {step:3d}/{args.steps}  loss {losses[-1]:.4f}")
        with torch.no_grad():
            trained_logits = adapted(input_ids)

        # 6. Merge: the side path folds into W.
        merged = surgery.apply_passes(adapted, [MergeLoRAPass()])
        merged_graph = to_networkx(merged)
        rewritten = sorted(a["module"] for _, a in merged_graph.nodes(data=True)
                           if a.get("rewritten"))
        with torch.no_grad():
            merge_delta = max_abs_diff(merged(input_ids), trained_logits)
        print(f"\nmerged: W <- W + (alpha/r) · B A on {len(rewritten)} layers; "
              f"LoRA nodes left in the graph: {len(inserted_nodes(merged_graph, 'lora'))}")
        print(f"merged vs adapted outputs: max|Δ| = {merge_delta:.2e} (float32 rounding)")
        render(merged, out / "4_merged.svg", options=picture)

        # 7. Unmerge: the weights come back bit for bit.
        unmerged = surgery.apply_passes(merged, [UnmergeLoRAPass()])
        base_weights = {n: p for n, p in model.named_parameters()}
        restored = [n for n, p in unmerged.named_parameters()
                    if n in base_weights and torch.equal(p, base_weights[n])]
        with torch.no_grad():
            unmerge_delta = max_abs_diff(unmerged(input_ids), trained_logits)
        print(f"unmerge exact: base weights bitwise equal: "
              f"{len(restored) == len(base_weights)} ({len(restored)}/{len(base_weights)} tensors); "
              f"outputs vs before merge: max|Δ| = {unmerge_delta}")
        if len(restored) != len(base_weights) or unmerge_delta != 0.0:
            print("FAILED: unmerge did not restore the model exactly")
            return 1
        print(f"pictures: {', '.join(sorted(p.name for p in out.glob('*.svg')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

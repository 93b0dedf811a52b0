"""The README tour as one runnable file, on the built-in small transformer.

1. load the built-in model (``TinyTransformer``: 2 pre-LN blocks, d_model 64, vocab 256);
2. list every candidate site with its structural role;
3. add LoRA to every ``attn.*`` projection and IA³ to keys, values and feed-forward down
   projections (traced by torch.fx: no example inputs needed);
4. print the audit: what trains now, and which pass made it so;
5. check that the adapted model's logits are bitwise equal to the original's;
6. train the adapters for a few steps on a toy next-token task;
7. draw the model before and after (``before.svg``, ``after.svg``, DOT sources, diff table).

Run::

    python examples/quickstart.py [--steps 10] [--out out/quickstart]

Without ``--out`` the diagrams go to a temporary folder that is removed at exit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import surgery
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery
import surgery.zoo
from surgery import IA3Pass, LoRAPass


def print_audit(adapted: nn.Module) -> None:
    try:
        from surgery import audit
    except ImportError:
        audit = None
    if audit is not None:
        print(audit(adapted))
        return
    trainable = sum(p.numel() for p in surgery.trainable_parameters(adapted))
    total = sum(p.numel() for p in adapted.parameters())
    print("(surgery.audit is not available in this version; counted with "
          "surgery.trainable_parameters)")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")


def draw(before: nn.Module, after: nn.Module, out: Path) -> None:
    try:
        from surgery import render_diff
    except ImportError as e:
        print(f"diagrams not written: surgery.render_diff is not available ({e})")
        return
    render_diff(before, after, out)
    print(f"diagrams written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the diagrams")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.zoo.load_model("builtin")
    model = spec.model
    (input_ids,) = spec.example_inputs                                   # int64 (2, 16)
    print(spec.description)
    print(surgery.list_targets(model))

    adapted = surgery.apply_passes(model, [LoRAPass(pattern="attn.*", rank=8, alpha=16), IA3Pass()],
                                   example_inputs=spec.example_inputs)  # inputs: shapes on edges
    print()
    print_audit(adapted)

    with torch.no_grad():
        same = torch.equal(adapted(input_ids), model(input_ids))
    print(f"\nbitwise equal at init: {same}")
    if not same:
        print("FAILED: the adapted model's logits differ at init")
        return 1

    # Toy task: predict each next token of a fixed random batch. Only adapters train.
    optimizer = torch.optim.AdamW(surgery.trainable_parameters(adapted), lr=1e-2)
    losses = []
    for step in range(1, args.steps + 1):
        logits = adapted(input_ids)                                      # (2, 16, 256)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               input_ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}/{args.steps}  loss {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        print("FAILED: the loss did not go down")
        return 1
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    if args.out is not None:
        draw(model, adapted, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            draw(model, adapted, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

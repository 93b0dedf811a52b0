"""LoRA on mixture-of-experts weights, fx-surgery against Hugging Face PEFT, side by side.

A transformers Qwen3-MoE configuration with random weights (hidden 256, 4 layers, 16
experts, top-2, expert width 256, 4 heads, vocab 4096; float32, CPU; batch 4 x 64 tokens),
LoRA rank 8, alpha 16 on every expert's ``gate_up_proj`` and ``down_proj``: ours
(``LoRAPass(target_parameters=[...])``: the low-rank update on the routed tokens, beside
transformers' grouped matmuls) against PEFT's ``LoraConfig(target_parameters=[...])`` (the
update folded into the whole expert weight at every forward). Before anything is timed, both
get the same adapter values (``B`` non-zero) and their logits are compared, and their
trainable / total parameter counts must be equal.

Measured: the eval forward (under ``torch.no_grad()``) and the train step (forward with the
model's own loss, backward, ``AdamW.step()``), medians of interleaved rounds
(:func:`timing.interleaved`), CPU and wall time, a second PEFT model in the same rounds as
the A/A control; and the torch CPU allocator's peak of one forward and of one train step
after warm-up (:func:`memory.torch_memory`, new storage only), as ratios ours / PEFT.

Run from the repository root::

    python benchmarks/bench_moe.py --threads 1            # about a minute
    python benchmarks/bench_moe.py --rounds 5 --no-write  # smoke run

Writes its table into ``benchmarks/results.md`` (its own section at the end, replaced on
each run) unless ``--no-write``; ``bench_vs_peft.py`` rewrites that whole file, so run this
one after it. Time targets are judged on CPU time. Not a test: nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from load import LoadSampler  # noqa: E402
from memory import torch_memory  # noqa: E402
from timing import interleaved  # noqa: E402
from torch import nn  # noqa: E402

import surgery  # noqa: E402
from surgery import LoRAPass  # noqa: E402

RANK, ALPHA, BATCH, SEQ, LR = 8, 16, 4, 64, 1e-4
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = 1e-4
"""Largest |logits ours - PEFT| accepted (same weights; the two round differently)."""
RESULTS = Path(__file__).resolve().parent / "results.md"
SECTION = "## Mixture-of-experts LoRA (`bench_moe.py`)"


def build() -> nn.Module:
    """The plain Qwen3-MoE model (seeded: every call gives the same weights)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=16, num_experts_per_tok=2, vocab_size=4096)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


def ours(model: nn.Module) -> nn.Module:
    return surgery.apply_passes(model, [LoRAPass(target_parameters=TARGETS, rank=RANK,
                                                 alpha=ALPHA)])


def peft_model(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_parameters=TARGETS, target_modules=[]))


def same_adapters(mine: nn.Module, *others: nn.Module) -> None:
    """Random ``B`` (N(0, 0.02²)) in ours, every LoRA factor copied by name into PEFT's."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in surgery.named_trainable_parameters(mine):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            for other in others:
                other.get_parameter("base_model.model." + name).copy_(p)


def step_fns(model: nn.Module, ids: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, train step)`` of ``model`` on ``ids``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return forward, train


def peak(fn: Callable[[], None], warmup: int = 2) -> int:
    for _ in range(warmup):
        fn()
    return torch_memory(fn)[0]


def main(argv: list[str] | None = None) -> int:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    start = time.time()
    with LoadSampler() as load:
        base = build()
        models = {"ours": ours(base), "peft": peft_model(base), "peft_again": peft_model(base)}
        same_adapters(models["ours"], models["peft"], models["peft_again"])
        n_ours = sum(p.numel() for p in surgery.trainable_parameters(models["ours"]))
        n_all = sum(p.numel() for p in models["ours"].parameters())
        if (n_ours, n_all) != models["peft"].get_nb_trainable_parameters():
            raise AssertionError("trainable / total parameters differ from PEFT's")
        for m in models.values():
            m.eval()
        with torch.no_grad():
            diff = (models["ours"](input_ids=ids).logits
                    - models["peft"](input_ids=ids).logits).abs().max().item()
        if diff > TOL:
            raise AssertionError(f"logits differ from PEFT's by {diff:g}")
        fns = {n: step_fns(m, ids) for n, m in models.items()}
        times = {kind: interleaved({n: ((lambda: None), (lambda _, f=f[k]: f()))
                                    for n, f in fns.items()}, args.rounds, warmup=3)
                 for k, kind in enumerate(("forward", "train"))}
        peaks = {kind: {n: peak(f[k]) for n, f in fns.items()}
                 for k, kind in enumerate(("forward", "train"))}
    head = (f"Qwen3-MoE (hidden 256, 4 layers, 16 experts, top-2, expert width 256), LoRA rank "
            f"{RANK} on gate_up_proj and down_proj, batch {BATCH} x {SEQ}; torch "
            f"{torch.__version__} ({torch.get_num_threads()} thread(s)), peft {peft.__version__};"
            f" medians of {args.rounds} rounds; {time.time() - start:.0f} s; load (1 min) "
            f"{load.summary()}. Same weights: max |logits ours - PEFT| {diff:.3g}; trainable "
            f"{n_ours:,} of {n_all:,} on both sides.")
    rows = ["| | ours | PEFT | ours / PEFT | A/A control | target |", "|---|---:|---:|---:|---:|---|"]
    for kind, target in (("forward", "<= 0.8x"), ("train", "<= 0.8x")):
        t = times[kind]
        for clock in ("cpu", "wall"):
            a, b, c = (getattr(t[n], clock) for n in ("ours", "peft", "peft_again"))
            label = "forward (eval)" if kind == "forward" else "train step"
            judged = f": {_verdict(a / b, 0.8)}" if clock == "cpu" else ""
            rows.append(f"| {label}, {clock.upper() if clock == 'cpu' else clock} time "
                        f"| {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}x | {c / b:.2f}x "
                        f"| {target}{judged} |")
    mib = 2 ** 20
    for kind in ("forward", "train"):
        p = peaks[kind]
        rows.append(f"| allocator peak, {'forward' if kind == 'forward' else 'train step'} "
                    f"| {p['ours'] / mib:.1f} MiB | {p['peft'] / mib:.1f} MiB "
                    f"| {p['ours'] / p['peft']:.3f}x | {p['peft_again'] / p['peft']:.3f}x "
                    f"| <= 1.0x: {_verdict(p['ours'] / p['peft'], 1.0)} |")
    text = "\n".join([head, "", *rows])
    print(text)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    if not args.no_write:
        _write(text)
    return 0


def _verdict(ratio: float, target: float) -> str:
    """``"met"`` or ``"**missed**"`` (time targets are judged on CPU time)."""
    return "met" if ratio <= target else "**missed**"


def _write(text: str) -> None:
    """Replace (or append) this benchmark's section of ``results.md``."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    before, found, after = old.partition(SECTION)
    rest = ""
    if found:
        nxt = after.find("\n## ")
        rest = after[nxt:] if nxt >= 0 else ""
    body = f"{SECTION}\n\n{text}\n"
    RESULTS.write_text((before.rstrip("\n") + "\n\n" if before.strip() else "") + body + rest)


if __name__ == "__main__":
    sys.exit(main())

"""LoRA on the convolutions of a small UNet-like stack: forward time against PEFT.

Diffusion fine-tunes put LoRA on ``nn.Conv2d``. The model here is a two-level UNet-like
stack (in 4 channels, widths 64 and 128, 3×3 convolutions, GroupNorm and SiLU, a strided
down-sampling convolution, nearest up-sampling, a skip connection by concatenation; 11
``nn.Conv2d`` in all), float32 on the CPU, batch 4 × 4 × 32 × 32. The same LoRA on both
sides: rank 8, alpha 16, no dropout, on every ``nn.Conv2d``; PEFT's adapter weights are
copied into ours by name (non-zero ``lora_B``, so the branch does real work), and the two
outputs are compared before anything is timed.

Measured, in interleaved rounds (:func:`timing.interleaved`): a forward in eval mode under
``torch.no_grad()``, and a training step (forward, mean-square loss, backward, AdamW over
the adapters). Reported as ours / PEFT's medians; the target is ≤ 1.0×.

::

    python benchmarks/bench_conv.py                   # 30 rounds, 1 thread
    python benchmarks/bench_conv.py --rounds 60 --threads 2

Not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed beside them).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved  # noqa: E402

from surgery import LoRAPass, apply_passes  # noqa: E402

RANK, ALPHA = 8, 16
SHAPE = (4, 4, 32, 32)


class Block(nn.Module):
    """``conv → GroupNorm → SiLU → conv → GroupNorm → SiLU`` plus a 1×1 skip convolution
    where the widths differ. Input ``(N, c_in, H, W)``, output ``(N, c_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm1(self.conv1(x)))
        h = torch.nn.functional.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """Two resolutions: ``(N, 4, H, W)`` → ``(N, 4, H, W)``; H and W even."""

    def __init__(self, channels: int = 4, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.enc = Block(width, width)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = Block(width, 2 * width)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = Block(3 * width, width)
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(self.stem(x))
        h = self.up(self.mid(self.down(skip)))
        return self.head(self.dec(torch.cat([h, skip], dim=1)))


def conv_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` of ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def build() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(ours, peft_model, x)`` on the same base and adapter weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TinyUNet().eval()
    names = conv_names(base)
    ours = apply_passes(base, [LoRAPass(pattern=names, rank=RANK, alpha=ALPHA)])
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names,
                        init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(base), config)
    prefix = "base_model.model."
    their_state = {k[len(prefix):]: v for k, v in theirs.state_dict().items() if "lora_" in k}
    own = ours.state_dict()
    missing = sorted(set(own_key for own_key in own if "lora_" in own_key) - set(their_state))
    if missing:
        raise SystemExit(f"parameter names differ from PEFT's: {missing[:4]}")
    ours.load_state_dict(their_state, strict=False)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    return ours, theirs, x


def check(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> float:
    """Largest ``|ours(x) - peft(x)|`` in eval mode; raises if above 1e-5 · (1 + max|y|)."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    diff = float((a - b).abs().max())
    if diff > 1e-5 * (1 + float(b.abs().max())):
        raise SystemExit(f"outputs differ from PEFT's by {diff:.3g}")
    return diff


def forward_step(model: nn.Module, x: torch.Tensor):
    """One eval-mode forward under ``torch.no_grad()``."""
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def train_step(model: nn.Module, x: torch.Tensor):
    """Forward, mean-square loss against ``x``, backward, AdamW over the adapters."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), x).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ours, theirs, x = build()
    diff = check(ours, theirs, x)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    print(f"TinyUNet, {len(conv_names(TinyUNet()))} Conv2d, LoRA rank {RANK} alpha {ALPHA}, "
          f"input {'×'.join(map(str, SHAPE))}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"trainable: ours {trainable[0]:,}, PEFT {trainable[1]:,}; "
          f"max |ours − PEFT| in eval = {diff:.3g}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'measure':<22}{'ours':>12}{'PEFT':>12}{'ratio':>9}")
    for label, make in (("forward (eval)", forward_step), ("train step", train_step)):
        steps = {"ours": make(ours, x), "peft": make(theirs, x)}
        timings = interleaved({n: ((lambda: None), (lambda _, s=s: s())) for n, s in steps.items()},
                              args.rounds, warmup=3)
        a, b = timings["ours"].wall, timings["peft"].wall
        print(f"{label:<22}{a * 1e3:>10.2f}ms{b * 1e3:>10.2f}ms{a / b:>8.2f}x")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

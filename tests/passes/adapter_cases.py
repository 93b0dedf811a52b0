"""Shared cases for the bottleneck adapter tests (tests/passes/test_adapters.py,
test_parallel_adapter.py, test_sublayers.py): helpers, small blocks, and the zoo models each
adapted once per session with every adapter of their row (one map each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.adapters import ParallelAdapterPass, SerialAdapterPass
from passes.bottleneck import BottleneckAdapter
from surgery import apply_passes

PROJ = ("down", "up")


def set_random(model: nn.Module, seed: int, *, which: tuple[str, ...] = ("up",)) -> None:
    """Give the chosen projections of every bottleneck adapter seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BottleneckAdapter):
                for part in which:
                    proj = getattr(mod, part)
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.3)
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.3)


@contextmanager
def capture(model: nn.Module, *names: str) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Record ``(first input, output)`` of the named submodules while the block runs."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out))) for n in names]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def adapter_params(sites: list[str], slot: str, name: str = "default") -> set[str]:
    """The parameter names of the bottlenecks ``<site>.<slot>.<name>.{down,up}.{weight,bias}``
    (``site`` ``""``: the model itself)."""
    return {".".join(p for p in (s, slot, name, proj, t) if p)
            for s in sites for proj in PROJ for t in ("weight", "bias")}


def branch(adapter: BottleneckAdapter, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """``up(act(down(x)))``, written out with the adapter's own projections."""
    return adapter.up(act(adapter.down(x)))


@dataclass(frozen=True)
class Row:
    """Names in one zoo model (``{i}`` = block): serial anchors, the feed-forward site and
    the layer whose input its parallel adapter reads, the same for attention (``None`` where
    the attention module cannot be a site graph)."""

    serial: tuple[str, ...]
    ffn: str
    ffn_in: str
    attn: str | None = None
    attn_in: str | None = None

    @staticmethod
    def names(fmt: str) -> list[str]:
        return [fmt.format(i=i) for i in range(2)]


ROWS = {
    "builtin:tiny": Row(("layers.{i}.attn.o_proj", "layers.{i}.mlp.down_proj"), "layers.{i}.mlp",
                        "layers.{i}.mlp.up_proj", "layers.{i}.attn", "layers.{i}.attn.q_proj"),
    "hf:gpt2": Row(("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
                   "transformer.h.{i}.mlp", "transformer.h.{i}.mlp.c_fc"),
    "hf:llama": Row(("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
                    "model.layers.{i}.mlp", "model.layers.{i}.mlp.up_proj"),
    "hf:bert": Row(("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"),
                   "encoder.layer.{i}.output", "encoder.layer.{i}.intermediate.dense",
                   "encoder.layer.{i}.attention.output", "encoder.layer.{i}.attention.self.query"),
}


def zoo_passes(row: Row) -> list[Any]:
    """Houlsby serial adapters, parallel adapters on the feed-forward blocks and, where the
    attention module can be a site graph, on the attention sub-layers."""
    passes = [SerialAdapterPass(bottleneck=8), ParallelAdapterPass(reduction_factor=8)]
    return passes + ([ParallelAdapterPass(role="attention", bottleneck=8)] if row.attn else [])


_ADAPTED: dict[str, nn.Module] = {}


def adapted_zoo(zoo: Any, name: str, snapshot: Callable[[nn.Module], Any]) -> nn.Module:
    """The zoo model ``name`` with every adapter of its row, applied once per session (one map
    each) and shared: tests that change it take a copy. The first call checks that the
    caller's model is left unchanged."""
    if name not in _ADAPTED:
        spec = zoo.spec(name)
        before = snapshot(spec.model)
        _ADAPTED[name] = apply_passes(spec.model, zoo_passes(ROWS[name]), spec.example_inputs,
                                      spec.example_kwargs or None)
        before.assert_unchanged(spec.model)
    return _ADAPTED[name]


class PreLNBlock(nn.Module):
    """LLaMA / GPT-2 style: ``final(x + dense(gelu(fc(norm(x)))))``; ``final`` stands for the
    next block's norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.dense = nn.Linear(16, 8)
        self.final = nn.LayerNorm(8)

    def sublayer(self, x: torch.Tensor) -> torch.Tensor:
        """``dense(gelu(fc(norm(x))))``: the feed-forward sub-layer, without residual."""
        return self.dense(F.gelu(self.fc(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(x + self.dense(F.gelu(self.fc(self.norm(x)))))


class MLP(nn.Module):
    """``x + down(relu(up(x)))``, widths 6 -> 16 -> 6."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.down = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def lora_update(adapted: nn.Module, site: str, h: torch.Tensor) -> torch.Tensor:
    """The update of ``LoRAPass(rank=2, alpha=4)`` at ``site``: ``2 · B A h``."""
    a, b = adapted.get_submodule(f"{site}.lora_A.default"), adapted.get_submodule(f"{site}.lora_B.default")
    return b(a(h)) * 2.0  # LoRA's scaling: alpha / rank = 4 / 2

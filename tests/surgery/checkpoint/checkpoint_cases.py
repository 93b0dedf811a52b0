"""Models, perturbation and checks shared by the tests of ``surgery/checkpoint/``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery import active_adapters, load_adapters, merged_adapters
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.zoo import ModelSpec


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable parameter (adapters, modules trained fully) non-zero random
    values, in place and reproducibly: IA³ vectors ~ U(0.5, 1.5), the rest gets N(0, 0.2²)
    added (so LoRA's ``B``, a bottleneck's ``up`` and a zero gate leave zero). A test that
    loads these must find them, not a fresh initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            for param in mod.parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(mod, AdapterParameters) and mod.pass_name == "ia3":
                    param.copy_(torch.rand(param.shape, generator=gen).to(param.dtype) + 0.5)
                else:
                    param.add_((torch.randn(param.shape, generator=gen) * 0.2).to(param.dtype))


def trainable(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys under adapter modules and adapters' parameter slots (IA³'s
    ``<layer>.ia3_l.<adapter>``), found by type."""
    outer = [q for q, m in model.named_modules()
             if isinstance(m, (AdapterModule, AdapterParameters))]
    return {k for k in model.state_dict() if any(k.startswith(q + ".") for q in outer)}


def assert_loaded_like(saved: nn.Module, loaded: nn.Module, base: nn.Module,
                       run: Callable[[nn.Module], torch.Tensor]) -> None:
    """``loaded`` is ``saved`` again: same class as the base, same state (every key, dtype
    and value, bitwise), same trainable parameters, active adapters and merge state, and
    bitwise the same outputs."""
    assert type(loaded) is type(base)
    assert trainable(loaded) == trainable(saved)
    assert active_adapters(loaded) == active_adapters(saved)
    assert merged_adapters(loaded) == merged_adapters(saved)
    want, got = saved.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    with torch.no_grad():
        assert torch.equal(run(loaded), run(saved))


def load_checked(base: nn.Module, directory: object, snapshot: Callable, **kwargs: object
                 ) -> nn.Module:
    """``load_adapters`` checking that neither ``base`` nor the global RNG state moved."""
    before = snapshot(base)
    rng = torch.get_rng_state()
    loaded = load_adapters(base, directory, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng), "load_adapters moved the global RNG"
    before.assert_unchanged(base)
    return loaded


class MLP(nn.Module):
    """``head(down(gelu(up(x))))``. Input float32 ``(batch, 8)``; output ``(batch, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(F.gelu(self.up(x))))


class Attention(nn.Module):
    """Hand-written causal attention: ``softmax(q kᵀ / sqrt(hd) + causal) v``, then ``out``."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.wq, self.wk, self.wv, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones_like(scores, dtype=torch.bool).tril()
        probs = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return self.out(torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d))


class FFN(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) · w3 x)``."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """A hand-written pre-LN transformer block with a head. Input float32 ``(batch, seq,
    32)``; output ``(batch, seq, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = Attention()
        self.ffn = FFN()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return self.head(x + self.ffn(self.norm2(x)))


class OddNames(nn.Module):
    """Submodules named like the parts of adapter keys: ``weight``, ``lora``, ``base``,
    ``lora_A``. Input float32 ``(batch, 8)``; output ``(batch, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Linear(8, 8)
        self.lora = nn.Linear(8, 8)
        self.base = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.lora_A = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_A(self.base(self.lora(self.weight(x))))


def hand_written(name: str, seed: int = 0) -> ModelSpec:
    """``"mlp"``, ``"block"`` or ``"odd"``, seeded, in evaluation mode, with inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = {"mlp": MLP, "block": Block, "odd": OddNames}[name]().eval()
        shape = (2, 6, 32) if name == "block" else (2, 8)
        return ModelSpec(name, model, (torch.randn(*shape),), {})

"""Small adapted models for the training-setup tests, built the same way in every process.

Each case is a seeded model of the zoo (or a seeded MLP / CNN) adapted with the adapter
kinds that apply to it, its adapter values moved away from their initialisation (so every
adapter gets a non-zero gradient, including the zero-initialised LoRA ``B`` and bottleneck
``up``), a global batch of four samples, and the loss a training loop would take. Building
a case twice, in this process or another, gives bitwise-equal weights and inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import surgery
from surgery import IA3Pass, LoRAPass, PrefixPass, SerialAdapterPass, apply_passes

__all__ = ["Case", "CASES", "build", "convnet", "perturb_adapters", "adapter_grads", "base_grads",
           "mlp"]

BATCH = 4
"""Samples in a global batch; two processes take two each."""

SEQ = 12
"""Tokens per sequence of the language-model cases."""


@dataclass
class Case:
    """An adapted model with a global batch and its loss.

    Attributes:
        name: a key of :data:`CASES`, or ``"convnet"``.
        model: the adapted model, adapters perturbed (in training mode from :func:`build`).
        batch: the global batch, a tensor whose first dimension is the sample
            (``BATCH`` of them): int64 token ids ``(4, SEQ)``, float32 features ``(4, 8)``
            or float32 images ``(4, 3, 32, 32)``.
        loss: ``loss(model, batch)``, a float32 scalar, the mean over the samples of
            ``batch`` (so the mean of two half-batch losses is the whole-batch loss).
    """

    name: str
    model: nn.Module
    batch: Tensor
    loss: Callable[[nn.Module, Tensor], Tensor]


def perturb_adapters(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add ``scale · N(0, 1)`` noise to every trainable parameter, in place, reproducibly
    (in the order of ``named_parameters``). Frozen parameters are not touched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in surgery.named_trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def adapter_grads(model: nn.Module) -> dict[str, Tensor]:
    """Clones of the gradients of the trainable parameters, by name.

    Raises:
        AssertionError: a trainable parameter got no gradient.
    """
    grads = {}
    for name, p in surgery.named_trainable_parameters(model):
        assert p.grad is not None, f"the adapter parameter {name!r} got no gradient"
        grads[name] = p.grad.detach().clone()
    return grads


def base_grads(model: nn.Module) -> list[str]:
    """Names of frozen parameters that hold a gradient (there should be none)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]


def _lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of a model that returns logits ``(batch, seq, vocab)``."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _hf_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """A transformers causal LM's own loss (mean over the shifted tokens)."""
    return model(input_ids=ids, labels=ids).loss


def _mlp_loss(model: nn.Module, x: Tensor) -> Tensor:
    """Mean squared error of a ``(batch, 8) -> (batch, 4)`` model against fixed targets."""
    target = torch.linspace(-1.0, 1.0, 4, dtype=x.dtype)
    return F.mse_loss(model(x), target.expand(x.shape[0], 4))


def _ids(vocab: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen)


def mlp() -> nn.Module:
    """A seeded ``8 -> 32 -> 32 -> 4`` ReLU MLP (``nn.Sequential``; layers 0, 2, 4)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 4))


def _tiny() -> Case:
    """TinyTransformer with LoRA on the attention projections, IA³, Houlsby serial adapters
    and a 4-token prefix."""
    model = surgery.load_model("builtin").model
    passes = [LoRAPass(pattern="attn.*", rank=4, alpha=8), IA3Pass(),
              SerialAdapterPass(placement="houlsby", bottleneck=8), PrefixPass(length=4)]
    return Case("tiny", apply_passes(model, passes), _ids(256, 1), _lm_loss)


def _llama() -> Case:
    """LlamaForCausalLM (2 layers, GQA) with LoRA on q/v, IA³, serial adapters and a prefix."""
    model = surgery.load_model("hf:llama").model
    # Selected by name: selecting by role would trace the model (torch.export), which
    # costs seconds in every process; the layers are those the roles pick.
    passes = [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8),
              IA3Pass(pattern=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
              SerialAdapterPass(pattern=["o_proj", "down_proj"], bottleneck=8),
              PrefixPass(length=4)]
    return Case("llama", apply_passes(model, passes), _ids(128, 2), _hf_loss)


def _mlp() -> Case:
    """The MLP with LoRA on two layers, a serial adapter after the middle one, IA³ on the last."""
    passes = [LoRAPass(pattern=["0", "2"], rank=4), SerialAdapterPass(pattern="2", bottleneck=4),
              IA3Pass(pattern="4")]
    x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(3))
    return Case("mlp", apply_passes(mlp(), passes), x, _mlp_loss)


CASES: dict[str, Callable[[], Case]] = {"tiny": _tiny, "llama": _llama, "mlp": _mlp}
"""Case builders by name."""


def convnet() -> Case:
    """The zoo's ConvNet (BatchNorm buffers, an integer ``num_batches_tracked`` among them)
    with LoRA on both convolutions and the first classifier layer and IA³ on the second
    convolution's channels; a batch of four 3 x 32 x 32 images, cross-entropy against
    fixed labels. Not in :data:`CASES`: in training mode BatchNorm normalises by the
    statistics of the batch it sees, so two half batches do not compute what the whole
    batch does."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = surgery.load_model("builtin:convnet").model
        lora = LoRAPass(pattern=["features.0", "features.4", "classifier.0"], rank=4)
        adapted = apply_passes(model, [lora, IA3Pass(pattern="features.4")])
    images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(BATCH)
    perturb_adapters(adapted)
    return Case("convnet", adapted, images, lambda m, x: F.cross_entropy(m(x), labels))


def build(name: str) -> Case:
    """Build the case ``name`` of :data:`CASES`: adapted, adapters perturbed, in train mode.

    The global RNG is seeded inside (LoRA's ``A`` is drawn from it) and restored after.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        case = CASES[name]()
    perturb_adapters(case.model)
    case.model.train()
    return case

"""The factors of LoRA on a fused expert weight, as PEFT's ``target_parameters``.

For a weight ``W`` of ``E`` experts, ``(E, out, in)`` (transformers' default layout; ``(E,
in, out)`` when the experts module says ``is_transposed``), PEFT's ``lora.ParamWrapper`` keeps
one factor pair for all experts, as ``nn.Linear`` weights:

* ``lora_A.<a>.weight`` ``(rank · E, in)``: expert ``e``'s ``A_e`` is rows ``e·r … e·r+r-1``
  (``A.reshape(E, r, in)[e]``);
* ``lora_B.<a>.weight`` ``(out, rank · E)``: expert ``e``'s ``B_e`` is columns ``e, E + e,
  2E + e, …`` (``B.reshape(out, r, E)[:, :, e]``);

and ``ΔW_e = scaling · B_e A_e``. :class:`ExpertLoRAFactor` holds one of them and applies it
to the routed tokens only: ``A`` maps the rows of ``x`` ``(S, in)`` that are sorted by
expert (``offs``, the cumulative counts per expert) through ``A_e`` with a grouped matmul,
``B`` maps them back through ``B_e``, so ``y_s = W_e x_s + scaling · B_e A_e x_s`` for the
expert ``e`` that row ``s`` was routed to, and no per-expert dense delta is ever formed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.lora_init import init_factor
from passes.moe_trace import grouped_linear
from surgery.adapters.merge_math import compute_dtype
from surgery.sites.marker import AdapterModule

__all__ = ["ExpertLoRAFactor", "expert_factors", "expert_delta"]


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert views ``(A (E, r, in), B (E, out, r))`` of PEFT-layout factors
    ``A`` ``(r·E, in)`` and ``B`` ``(out, r·E)`` (no copy)."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, scaling: float,
                 *, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """``ΔW`` ``(E, out, in)`` (``(E, in, out)`` when ``transposed``) with ``ΔW_e = scaling ·
    B_e A_e``, computed in ``dtype`` (at least float32 for a merge)."""
    a, b = expert_factors(lora_a.to(dtype), lora_b.to(dtype), num_experts)
    delta = torch.bmm(b, a) * scaling
    return delta.transpose(-2, -1) if transposed else delta


def _aligned(rank: int, dtype: torch.dtype) -> int:
    """``rank`` rounded up so that a row of ``rank`` elements of ``dtype`` spans a multiple
    of 16 bytes, the row stride ``torch._grouped_mm`` requires of its operands (4 float32
    or 8 bfloat16 elements); the factors are padded with zeros to it inside the forward,
    which leaves the update unchanged."""
    per_row = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-rank // per_row) * per_row


class ExpertLoRAFactor(AdapterModule):
    """One factor of LoRA on a fused expert weight (see the module docstring).

    ``forward(x, offs)``: ``A`` maps ``x`` ``(S, in)``, rows sorted by expert, to ``(S,
    rank)``; ``B`` maps ``(S, rank)`` to ``(S, out)``; ``offs`` ``(E,)`` int32 are the
    cumulative row counts per expert (what the experts forward hands its grouped linears).

    Args:
        num_experts, in_features, out_features: ``E`` and the per-expert ``W_e``
            ``(out, in)``.
        factor: ``"A"`` or ``"B"``.
        param: the name of the adapted parameter on its experts module (``"gate_up_proj"``).
        rank, alpha, scaling: the update's hyper-parameters; ``lora_B`` carries them.
        transposed: the weight is stored ``(E, in, out)`` (``is_transposed``).
        init: ``"kaiming"`` (A Kaiming-uniform, as ``nn.Linear``; B zero), ``"gaussian"``
            (A normal, std ``1/rank``; B zero) or ``"random"`` (both Kaiming-uniform, as
            PEFT's ``init_lora_weights=False``).
        site, adapter_name, role: see :class:`~surgery.sites.marker.AdapterModule`.
        dtype, device: of the new weight (the expert weight's).

    Inactive, no matmul runs: ``A`` returns a zero scalar and ``B`` ``-0.0``, which the
    branch's add broadcasts (``y + (-0.0)`` is ``y`` bit for bit). Per-sample routing
    (:class:`passes.stack.AdapterStack`) is not offered: the rows are routed tokens, not
    samples.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = False

    def __init__(self, *, num_experts: int, in_features: int, out_features: int, factor: str,
                 param: str, rank: int, alpha: float, scaling: float, transposed: bool,
                 init: str, site: str, adapter_name: str, role: str | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.num_experts = num_experts
        self.in_features, self.out_features = in_features, out_features
        self.factor, self.param, self.rank = factor, param, rank
        self.alpha, self.scaling, self.transposed = alpha, scaling, transposed
        shape = (rank * num_experts, in_features) if factor == "A" else (out_features,
                                                                         rank * num_experts)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        init_factor(self.weight, factor=factor, init=init, rank=rank)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if not self.active:  # -0.0: the branch's add then returns its other operand exactly
            return x.new_full((), -0.0 if self.factor == "B" else 0.0)
        E = self.num_experts
        if self.factor == "A":
            weight = self.weight.reshape(E, self.rank, self.in_features)  # (E, r, in)
            padded = _aligned(self.rank, weight.dtype)
            if padded != self.rank:  # zero rows: the extra columns of A x are zeros
                weight = F.pad(weight, (0, 0, 0, padded - self.rank))
        else:  # (E, out, r), made contiguous: a copy of B's size, not of a weight's
            weight = self.weight.reshape(self.out_features, self.rank, E).permute(2, 0, 1)
            if x.shape[-1] != self.rank:  # A's padded rank: zero columns read its zeros
                weight = F.pad(weight, (0, x.shape[-1] - self.rank))
            weight = weight.contiguous()
        return grouped_linear()(x, weight, offs)

    def extra_repr(self) -> str:
        return (f"{self.factor} of {self.param}: {self.num_experts} experts, "
                f"{self.in_features} -> {self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, {super().extra_repr()}")

    # ------------------------------------------------------------------ fold protocol
    # ``lora_B`` heads the update of its parameter; ``lora_A`` sits beside it in the same
    # holder (``<holder>.lora_A[<name>]``).

    @property
    def fold_mode(self) -> str | None:
        """``"param"`` for ``lora_B`` (it folds into the site's parameter :attr:`param`),
        ``None`` for ``lora_A``."""
        return "param" if self.factor == "B" else None

    @property
    def fold_param(self) -> str:
        """The site-graph parameter this update folds into."""
        return self.param

    def partner(self, site: nn.Module) -> ExpertLoRAFactor:
        """The ``lora_A`` of this ``lora_B``: the module registered next to it."""
        for mod in site.modules():
            if (isinstance(mod, ExpertLoRAFactor) and mod.factor == "A"
                    and mod.param == self.param and mod.adapter_name == self.adapter_name):
                return mod
        raise LookupError(f"no lora_A of {self.param} for adapter {self.adapter_name!r} at "
                          f"{self.site}")

    def fold_value(self, site: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``W + ΔW`` for the stored weight ``W`` (``(E, out, in)``, or ``(E, in, out)``
        transposed), computed in at least float32 and cast once to ``W``'s dtype."""
        dtype = compute_dtype(weight.dtype)
        delta = expert_delta(self.partner(site).weight.detach(), self.weight.detach(),
                             self.num_experts, self.scaling, transposed=self.transposed,
                             dtype=dtype)
        return (weight.detach().to(dtype) + delta).to(weight.dtype)

    def fold_detail(self, site: nn.Module) -> str:
        return (f"{self.param}[e] + {self.scaling:g}·B_e A_e of LoRA {self.adapter_name!r} "
                f"({self.num_experts} experts)")

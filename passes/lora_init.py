"""How a LoRA branch's factors start: the names ``LoRAPass(init=...)`` accepts (PEFT 0.21's
``init_lora_weights``) and the initialisations that are more than one ``nn.init`` call.
``A`` is ``(r, in)``, ``B`` is ``(out, r)``, ``s`` the branch's scaling.

- ``"kaiming"``: A Kaiming-uniform (``a = sqrt(5)``), B zero (PEFT's ``True``). Output
  unchanged at init, bit for bit.
- ``"gaussian"``: A normal with std ``1/r``, B zero (PEFT's ``"gaussian"``). Bit for bit.
- ``"orthogonal"``: A and B from two disjoint halves of the rows of one random orthogonal
  ``r × r`` matrix, both non-zero, ``B A = 0`` up to rounding (PEFT's ``"orthogonal"``; even
  ranks only). Output unchanged up to rounding.
- ``"random"``: A and B both Kaiming-uniform (PEFT's ``False``; an embedding's factors
  both standard normal, as PEFT's). The output CHANGES at init: for tests of the update
  path, not for training. Offered on every layer kind.
- ``"pissa"``: PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation of Large Language Models"): ``W = U S Vᵀ``, ``A = sqrt(S_r / s) V_rᵀ``,
  ``B = U_r sqrt(S_r / s)``, and the layer's weight becomes the residual ``W - s·B A``
  (PEFT's ``"pissa"``). Output unchanged up to rounding.
- ``"pissa_niter_<K>"``: the same from ``torch.svd_lowrank(W, r, niter=K)``; its random
  numbers come from torch's generator seeded (inside ``torch.random.fork_rng``, so the
  global state is left as it was) with a CRC-32 of the site's name, the adapter's name and
  the rank, so every run, and every replay, gives the same factors.
- ``"olora"``: OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large
  Language Models"): ``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]``, and the weight becomes
  ``W - s·B A`` (PEFT's ``"olora"``).

``nn.Linear`` and transformers' ``Conv1D`` take every one; convolutions and embeddings take
``kaiming`` and ``gaussian`` only. PiSSA and OLoRA read ``W`` as ``(out, in)`` (a ``Conv1D``
weight transposed; PEFT's OLoRA does not transpose it), in float32, and put the residual,
cast once to the weight's dtype, in a NEW parameter of the adapted model's site graph (the
caller's weight is not changed; a weight tied to another module is refused); the pass
records a ``param_rewritten`` change, which the audit shows. Merging or unloading folds
``s·B A`` into the residual, giving ``W_res + s·B A`` (PEFT's ``merge_and_unload``; ``W``
again up to rounding while the factors are untrained). ``save_adapters`` /
``load_adapters`` replay the pass on the base: the SVD / QR of the same base gives the same
residual bit for bit on the same machine, then the file's factors replace the initial
ones. ``export_peft`` refuses these adapters (PEFT's files apply to the original base).
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import nn

from surgery.errors import ConfigError, UnsupportedSiteError, near_matches
from surgery.pass_base import Change

__all__ = ["BASE_REWRITING", "INITS", "LINEAR_ONLY_INITS", "check_init", "init_factor",
           "is_linear_only", "orthogonal_factors", "rewrite_base", "rewrites_base",
           "weight_factors"]

INITS: tuple[str, ...] = ("kaiming", "gaussian", "orthogonal", "random", "pissa",
                          "pissa_niter_<K>", "olora")
"""Every name ``LoRAPass(init=...)`` accepts (``<K>`` a positive int)."""

LINEAR_ONLY_INITS: tuple[str, ...] = ("orthogonal", "pissa", "olora")
"""The names (``pissa_niter_<K>`` with ``pissa``) only ``nn.Linear`` and ``Conv1D`` take."""

BASE_REWRITING: tuple[str, ...] = ("pissa", "olora")
"""The names (``pissa_niter_<K>`` with ``pissa``) that rewrite the base weight."""

_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
_NOT_OFFERED = {"loftq": "LoftQ", "eva": "EVA", "corda": "CorDA", "lora_ga": "LoRA-GA",
                "mica": "MiCA"}


def init_factor(weight: torch.Tensor, *, factor: str, init: str, rank: int) -> None:
    """Initialise a LoRA factor in place, as PEFT's ``init_lora_weights``: ``B`` at zero
    (unless ``init="random"``, PEFT's ``False``: then as ``A``); ``A`` Kaiming-uniform with
    ``a = √5`` (``nn.Linear``'s own default, PEFT's ``True``), or normal with standard
    deviation ``1 / rank`` for ``"gaussian"``. Any weight shape (``(r, in)``, ``(out, r)``,
    a convolution's ``(out, in / groups, *kernel)``, an expert-stacked ``(r·E, in)``).
    Other names initialise as the default and are rewritten later (PiSSA, OLoRA,
    orthogonal)."""
    if factor == "B" and init != "random":
        nn.init.zeros_(weight)
    elif init == "gaussian":
        nn.init.normal_(weight, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _family(init: str) -> str:
    return "pissa" if _NITER.fullmatch(init) else init


def is_linear_only(init: str) -> bool:
    """``init`` is offered on ``nn.Linear`` and ``Conv1D`` only."""
    return _family(init) in LINEAR_ONLY_INITS


def rewrites_base(init: str) -> bool:
    """``init`` rewrites the base weight to a residual (PiSSA, OLoRA)."""
    return _family(init) in BASE_REWRITING


def check_init(init: object) -> str:
    """Why ``init`` is not a valid ``LoRAPass`` init (``""`` when it is one): the message
    lists the valid names and the nearest one."""
    if isinstance(init, str) and (init in INITS and "<" not in init or _NITER.fullmatch(init)):
        return ""
    valid = ", ".join(repr(i) for i in INITS)
    text = f"init must be one of {valid}, got {init!r}"
    if isinstance(init, str):
        head = init.lower().split("_niter_")[0]
        if head in _NOT_OFFERED:
            return (f"{text}: {_NOT_OFFERED[head]} initialisation is not supported. Way "
                    f"out: use one of the valid names")
        near = near_matches(init, [i for i in INITS if "<" not in i], n=2)
        if near:
            return f"{text} (nearest: {', '.join(repr(n) for n in near)})"
    return text


def orthogonal_factors(in_features: int, out_features: int, rank: int, *,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's orthogonal LoRA initialisation: ``(A (rank, in), B (out, rank))``.

    A random ``rank × rank`` matrix is QR-factorised; ``A = (G_a · Q[0::2])ᵀ / 10`` and
    ``B = G_b · Q[1::2] / 10`` with ``G_a`` ``(in, rank/2)`` and ``G_b`` ``(out, rank/2)``
    standard normal. The even and odd rows of ``Q`` are orthonormal to each other, so
    ``B A = G_b Q[1::2] Q[0::2]ᵀ G_aᵀ / 100 = 0`` up to rounding, while both factors are
    non-zero. Draws, in order, ``randn(rank, rank)``, ``randn(in, rank/2)`` and
    ``randn(rank/2, out)`` from torch's global generator on the CPU, in float32 (as PEFT
    0.21's ``LoraLayer.orthogonal_init``, so the same seed gives the same factors), then casts
    to ``dtype``.

    Reference: https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation

    Raises:
        ConfigError: an odd ``rank``.
    """
    if rank % 2:
        raise ConfigError(f"LoRAPass(init='orthogonal'): the rank must be even (A and B take "
                          f"half the rows of an orthogonal matrix each), got {rank}. Way out: "
                          f"an even rank (rank_for for single sites), or another init.")
    q, _ = torch.linalg.qr(torch.randn(rank, rank))
    lora_a = torch.randn(in_features, rank // 2).mm(q[0::2, :]).T / 10.0
    lora_b = torch.randn(rank // 2, out_features).T.mm(q[1::2, :]) / 10.0
    return lora_a.contiguous().to(dtype), lora_b.contiguous().to(dtype)


def _seed(site: str, adapter_name: str, rank: int) -> int:
    """The seed of a site's randomised SVD: a CRC-32 of its name, adapter and rank."""
    return zlib.crc32(f"{site}\0{adapter_name}\0{rank}".encode())


def weight_factors(weight: torch.Tensor, *, init: str, rank: int, scaling: float,
                   transposed: bool, site: str, adapter_name: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA / OLoRA factors of a base weight and the residual it becomes.

    Args:
        weight: ``(out, in)``, or ``(in, out)`` with ``transposed`` (``Conv1D``); float32,
            float16 or bfloat16.
        init: ``"pissa"``, ``"pissa_niter_<K>"`` or ``"olora"``.
        rank, scaling: of the branch.
        site, adapter_name: seed the randomised SVD of ``pissa_niter_<K>``.

    Returns:
        ``(A (rank, in), B (out, rank), residual)``: the factors in float32, the residual
        ``W - scaling · B A`` computed in float32 and cast once to ``weight``'s dtype, in
        ``weight``'s layout. ``weight`` is not changed.

    Raises:
        ConfigError: ``weight`` is not float32, float16 or bfloat16 (as PEFT), or ``rank``
            exceeds ``min(out, in)``.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"LoRAPass(init={init!r}): {site}.weight is {weight.dtype}; PiSSA "
                          f"and OLoRA need float32, float16 or bfloat16. Way out: convert the "
                          f"model, or another init.")
    w = weight.detach().to(torch.float32)
    w = w.T if transposed else w
    if rank > min(w.shape):
        raise ConfigError(f"LoRAPass(init={init!r}): {site} is {w.shape[0]} × {w.shape[1]} "
                          f"(out × in), so it has at most {min(w.shape)} singular vectors; "
                          f"rank {rank} is more. Way out: rank_for={{{site!r}: "
                          f"{min(w.shape)}}}, or another init.")
    niter = _NITER.fullmatch(init)
    if init == "olora":
        q, r = torch.linalg.qr(w)
        lora_a, lora_b = r[:rank].contiguous(), q[:, :rank].contiguous()
    else:
        if niter:
            devices = [w.device] if w.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_seed(site, adapter_name, rank))
                u, s, v = torch.svd_lowrank(w, rank, niter=int(niter.group(1)))
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.diag(torch.sqrt(s[:rank] / scaling))
        lora_a, lora_b = root @ vh[:rank], u[:, :rank] @ root
    residual = (w - scaling * lora_b @ lora_a).to(weight.dtype)
    return lora_a, lora_b, (residual.T if transposed else residual).contiguous()


def rewrite_base(model: nn.Module, site_graph: nn.Module, lora_a: nn.Module,
                 lora_b: nn.Module, *, init: str, rank: int, scaling: float, transposed: bool,
                 site: str, aliases: tuple[str, ...], adapter_name: str, role: str | None,
                 pass_name: str) -> list[Change]:
    """Start a branch as PiSSA / OLoRA (:func:`weight_factors`): copy the factors into
    ``lora_a.weight`` ``(rank, in)`` / ``lora_b.weight`` ``(out, rank)`` (in their dtype)
    and put the residual in a NEW parameter ``weight`` of ``site_graph`` (same
    ``requires_grad``); the parameter it replaces, shared with the caller's model, is not
    changed.

    Returns:
        ``[Change("param_rewritten", ...)]`` for ``<site>.weight``, detail naming the init,
        ``trainable=False`` (the pass then freezes the site's base parameters).

    Raises:
        UnsupportedSiteError: the weight is tied to a parameter outside the site (rewriting
            it would untie them).
        ConfigError: see :func:`weight_factors`.
    """
    weight = site_graph._parameters["weight"]
    own = {f"{a}.weight" if a else "weight" for a in aliases}
    tied = [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is weight and n not in own]
    if tied:
        raise UnsupportedSiteError(
            f"LoRAPass(init={init!r}): {site}.weight is tied to {tied[0]}; rewriting it to "
            f"the residual would untie them. Way out: exclude {site}, or another init.")
    a, b, residual = weight_factors(weight, init=init, rank=rank, scaling=scaling,
                                    transposed=transposed, site=site, adapter_name=adapter_name)
    with torch.no_grad():
        lora_a.weight.copy_(a)
        lora_b.weight.copy_(b)
    site_graph._parameters["weight"] = nn.Parameter(residual, requires_grad=weight.requires_grad)
    label = "OLoRA" if init == "olora" else "PiSSA"
    detail = f"{label} residual W - {scaling:g}·B A ({init}, rank {rank})"
    name = ".".join(x for x in (site, "weight") if x)
    return [Change("param_rewritten", pass_name, site, name, adapter=adapter_name, role=role,
                   shape=tuple(residual.shape), numel=residual.numel(),
                   trainable=False, detail=detail)]

"""Layer sizes whatever the weight layout, and the warning for a rank a layer cannot hold."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable

from torch import nn

from surgery.map.leaves import is_hf_conv1d
from surgery.sites.site_graph import base_module

__all__ = ["layer_features", "require_plain_weight", "user_stacklevel", "warn_rank_exceeds"]



def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer, whatever its weight layout.

    ``nn.Linear`` stores its weight ``(out, in)``, transformers' ``Conv1D`` ``(in, out)``,
    ``nn.Conv*`` ``(out, in / groups, *kernel)``, ``nn.Embedding`` ``(num_embeddings, dim)``
    (in = the vocabulary); ``nn.MultiheadAttention`` maps ``embed_dim`` to ``embed_dim``.
    A site graph is judged by the module it replaced. Returns ``None`` for a module without
    a recognisable weight.
    """
    module = base_module(module)
    if is_hf_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def warn_rank_exceeds(sites: Iterable, rank: int, *, pass_name: str) -> None:
    """Warn when ``rank`` is larger than ``min(in_features, out_features)`` of a site (for
    a convolution, ``in_features`` counts ``in_channels · kernel`` values, what LoRA's ``A``
    reads at each position).

    ``sites`` are :class:`surgery.targets.Site` records. A low-rank update ``B A`` of such a
    layer cannot have a rank above that minimum, so the extra rank only adds parameters. This is a warning, not an error: the result is still a
    correct (if wasteful) adapter.
    """
    over = []
    for site in sites:
        feats = layer_features(site.module)
        if feats is None:
            continue
        module = base_module(site.module)
        size_in = str(feats[0])
        if isinstance(module, nn.modules.conv._ConvNd):  # A reads in_channels · kernel values
            kernel = math.prod(module.kernel_size)
            feats = (feats[0] * kernel, feats[1])
            size_in = f"{module.in_channels}·{kernel}" if kernel > 1 else size_in
        if rank > min(feats):
            over.append(f"{site.qname} ({type(module).__name__}, {size_in} -> {feats[1]})")
    if over:
        shown = ", ".join(over[:5]) + (f", ... ({len(over)} layers)" if len(over) > 5 else "")
        warnings.warn(
            f"{pass_name}: rank {rank} is larger than min(in_features, out_features) of {shown}; "
            f"the update B A there cannot have a rank above that minimum, so the extra rank only "
            f"adds parameters. Way out: a smaller rank, or exclude=... those layers.",
            UserWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised in the caller at the first frame
    outside this package and ``passes`` (the user's ``apply_passes(...)`` line)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # surgery/
    roots = (package + os.sep, os.path.join(os.path.dirname(package), "passes") + os.sep)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame = frame.f_back
        level += 1
    return level


def require_plain_weight(site_name: str, module: nn.Module, *, who: str) -> None:
    """Refuse a layer whose ``weight`` is computed rather than held, or held as integers.

    ``torch.nn.utils.parametrize`` (weight norm, spectral norm, orthogonal) and
    ``torch.nn.utils.prune`` compute ``weight`` from other tensors at every call; an adapter
    on such a layer could not be merged and would read a weight that is not a parameter.

    Raises:
        UnsupportedSiteError: naming the layer, its type and the way out; also for a weight
            held as an integer dtype (``int8``: a quantized checkpoint loaded as plain
            tensors), on which no adapter can train or merge.
    """
    from surgery.errors import UnsupportedSiteError

    module = base_module(module)
    weight = module._parameters.get("weight")
    if isinstance(weight, nn.Parameter) and not (weight.is_floating_point()
                                                 or weight.is_complex()):
        raise UnsupportedSiteError(
            f"{who}: {site_name or 'the model'} ({type(module).__name__}) holds its weight as "
            f"{weight.dtype}; adapter parameters take the weight's dtype and must be floating "
            f"point to train, and an integer weight cannot take a merged update. Way out: "
            f"adapt the floating-point model (before quantizing it; float16 and bfloat16 "
            f"work), or exclude=[{site_name!r}].")
    if isinstance(weight, nn.Parameter):
        return
    if hasattr(module, "parametrizations"):
        how = "parametrised (torch.nn.utils.parametrize)"
        undo = "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
    elif hasattr(module, "weight_orig"):
        how, undo = "pruned (torch.nn.utils.prune)", "torch.nn.utils.prune.remove(layer, 'weight')"
    else:
        how, undo = "not a parameter", "a plain nn.Parameter as its weight"
    raise UnsupportedSiteError(
        f"{who}: {site_name or 'the model'} ({type(module).__name__}) has a weight that is "
        f"{how}: it is computed from other tensors at every call, so an adapter cannot be "
        f"placed beside it or merged into it. Way out: make the weight a plain parameter first "
        f"({undo}), or exclude=[{site_name!r}].")

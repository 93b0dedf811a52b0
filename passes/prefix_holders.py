"""Site graphs of modules that call an ``nn.MultiheadAttention`` but whose own ``forward``
torch.fx cannot trace as written.

:class:`passes.prefix.PrefixPass` puts the prefix of an ``nn.MultiheadAttention`` in the
site graph of the module calling it (:mod:`passes.prefix_graph`). ``nn.TransformerEncoderLayer``
cannot be traced: before computing anything its ``forward`` checks its inputs (``src.dim()``,
mask types, grad mode) to choose PyTorch's fused "fast path" kernel. Its site graph is traced
instead from the computation its ``forward`` runs when the fast path is off (with gradients
enabled, in training, or under ``torch.backends.mha.set_fastpath_enabled(False)``)::

    x = norm1(x + sa(x, mask, key_padding_mask))     # norm_first=False
    x = norm2(x + ff(x))

    x = x + sa(norm1(x), mask, key_padding_mask)     # norm_first=True
    x = x + ff(norm2(x))

where ``sa`` is the layer's self-attention block (its ``nn.MultiheadAttention`` followed by
``dropout1``) and ``ff`` its feed-forward block. The site graph holds the layer's own
modules and parameters (state-dict keys unchanged) and its template is the layer itself, so
unloading puts back an ``nn.TransformerEncoderLayer``. The fused kernel agrees with this
computation to about 1e-6, so an adapted model in ``eval()`` under ``torch.no_grad()``
matches the original to that tolerance, not bitwise.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from surgery.sites.site_graph import SiteGraph, install, make_site_graph, module_aliases

__all__ = ["holder_site_graph", "traceable"]


class _TraceableEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without its fast-path checks; traced, never run."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,  # type: ignore[override]
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                          is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


_TraceableEncoderLayer.__name__ = _TraceableEncoderLayer.__qualname__ = "TransformerEncoderLayer"

# module forward as written -> the class whose forward computes the same, traceably
_STAND_INS: dict[object, type[nn.Module]] = {
    nn.TransformerEncoderLayer.forward: _TraceableEncoderLayer,
}


def traceable(module: nn.Module) -> bool:
    """True when ``module``'s ``forward`` is one this file traces by a stand-in."""
    return getattr(type(module), "forward", None) in _STAND_INS


def holder_site_graph(model: nn.Module, qname: str, *, who: str) -> tuple[nn.Module, SiteGraph]:
    """Install the site graph of the module at ``qname`` traced from its stand-in.

    Args:
        model: the working model.
        qname: the holder's qualified name (an ``nn.TransformerEncoderLayer``; not ``""``).
        who: the pass asking, named in errors.

    Returns:
        ``(root, site_graph)`` as :func:`surgery.sites.site_graph.site_graph_at` returns
        them; a site graph already there is returned as is.

    Raises:
        UnsupportedSiteError: from :func:`surgery.sites.site_graph.make_site_graph`.
    """
    module = model.get_submodule(qname) if qname else model
    if isinstance(module, SiteGraph):
        return model, module
    stand = copy.copy(module)  # shares every module, parameter and attribute
    stand.__class__ = _STAND_INS[type(module).forward]
    sg = make_site_graph(stand, qname, who=who)
    template = sg.template
    template.__class__ = type(module)  # unload rebuilds the user's class
    return install(model, module_aliases(model, module) or [qname], sg), sg

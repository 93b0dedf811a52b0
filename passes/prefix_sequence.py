"""``PrefixPass(mode="sequence")``: ``P`` learned vectors in front of a module's input.

Each selected module becomes a site graph whose input goes through the prefix first::

    def forward(self, x):                       # x: (B, L, d)
        x2 = self.prefix.default(x)             # (B, P + L, d)
        ...                                     # the module's own code, on x2

The input must be floating-point ``(batch, seq, d)`` features on the example inputs given
to ``apply_passes``, and the longer sequence must reach the model's output: the pass runs
the adapted model once on those inputs and refuses a site where that fails
(:func:`passes.prefix_probe.check_sequence_sites`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from passes.prefix_modules import SequencePrefix
from passes.prefix_probe import SequenceSite, check_sequence_sites, record_inputs
from surgery.adapters.names import identifier_part
from surgery.errors import UnsupportedSiteError
from surgery.pass_base import Change, PassResult
from surgery.select import select_names
from surgery.sites.rewrite import (
    freeze_site,
    mark,
    register_adapter,
    replace_uses_after,
)
from surgery.sites.site_graph import base_module, site_graph_at
from surgery.targets import candidate_sites

__all__ = ["run_sequence", "sequence_layout"]

DETAIL = "sequence prefix (B, L, d) -> (B, P + L, d)"


def sequence_layout(module: nn.Module, x: torch.Tensor | None,
                    qname: str) -> tuple[int, int, torch.dtype, torch.device]:
    """``(width d, sequence dim, dtype, device)`` for a prefix on ``module``'s input ``x``.

    ``x`` (the input on the example inputs) must be a floating-point ``(batch, seq, d)``
    tensor; ``d`` is its last size. The sequence dimension is 1 unless the module (or a
    submodule) says ``batch_first=False`` (``(seq, batch, d)``). The dtype and device are
    those of the module's first floating-point parameter, else of ``x``.

    Raises:
        UnsupportedSiteError: ``x`` is missing (the run never reached the module) or is not
            a floating-point 3-D tensor (token ids, masks, an unbatched ``(seq, d)``...).
    """
    kind = type(base_module(module)).__name__
    if x is None:
        raise UnsupportedSiteError(
            f"PrefixPass: the model never called {qname} ({kind}) with a tensor on its example "
            f"inputs; mode='sequence' needs its (batch, seq, d) input. Way out: select a "
            f"module the model calls with such features.")
    if x.dim() != 3 or not x.is_floating_point():
        raise UnsupportedSiteError(
            f"PrefixPass: the input of {qname} ({kind}) on the example inputs is {x.dtype} of "
            f"shape {tuple(x.shape)}; mode='sequence' needs floating-point features (batch, "
            f"seq, d). Way out: select a module that reads such features and whose sequence "
            f"length flows to the output (e.g. an nn.TransformerEncoder called without "
            f"masks), or mode='attention' to prefix keys and values.")
    batch_first = next((bool(m.batch_first) for m in base_module(module).modules()
                        if hasattr(m, "batch_first")), True)
    own = [(p.dtype, p.device) for p in module.parameters() if p.is_floating_point()]
    dtype, device = own[0] if own else (x.dtype, x.device)
    return int(x.shape[-1]), 1 if batch_first else 0, dtype, device


def run_sequence(model: nn.Module, *, pattern: Any, exclude: Any, adapter: str,
                 make: Any) -> PassResult:
    """Run sequence mode on ``model`` (see the module docstring).

    Args:
        pattern, exclude: the pass's selection (names of any modules).
        adapter: the adapter name.
        make: builds a :class:`SequencePrefix` with the pass's settings
            (``make(SequencePrefix, qname, **shape)``).

    Raises:
        NoMatchError: the selection matches nothing.
        UnsupportedSiteError: see :func:`sequence_layout`, :func:`record_inputs` and
            :func:`check_sequence_sites`.
    """
    cands = [n for n in candidate_sites(model, lambda m: True) if n]
    names = select_names(cands, pattern, exclude, pass_name="PrefixPass", all_names=cands)
    inputs = record_inputs(model, names)
    layouts = {q: sequence_layout(model.get_submodule(q), inputs[q], q) for q in names}
    changes: list[Change] = []
    sites: list[SequenceSite] = []
    root = model
    for qname in names:
        width, seq_dim, dtype, device = layouts[qname]
        root, sg = site_graph_at(root, qname, who="PrefixPass")
        seq = make(SequencePrefix, qname, width=width, seq_dim=seq_dim, role=None, dtype=dtype,
                   device=device)
        register_adapter(sg, "prefix", adapter, seq, pass_name="PrefixPass", site=qname)
        graph, x = sg.graph, sg.input_node
        with graph.inserting_after(x):
            new = mark(graph.create_node("call_module", f"prefix.{adapter}", (x,), {},
                                         name=f"prefix_{identifier_part(adapter)}"),
                       pass_name="prefix", site=qname, role=None, adapter=adapter, part="prefix")
        replace_uses_after(x, new)
        sg.recompile()
        for pname, param in seq.named_parameters():
            changes.append(Change("param_added", "prefix", qname,
                                  f"{qname}.prefix.{adapter}.{pname}", adapter=adapter,
                                  shape=tuple(param.shape), numel=param.numel(), trainable=True,
                                  detail=DETAIL))
        changes.append(Change("node_added", "prefix", qname, f"{qname}/{new.name}",
                              adapter=adapter, detail="sequence prefix; changes output shapes"))
        changes.extend(freeze_site(sg, pass_name="prefix", site=qname, role=None))
        x_in = inputs[qname]
        sites.append(SequenceSite(qname, sg, tuple(x_in.shape), x_in.dtype))
    check_sequence_sites(root, sites, adapter)
    return PassResult(root, bool(changes), tuple(changes), "prefix")

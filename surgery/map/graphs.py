"""A uniform view of a traced model: every fx graph, every node, every call site.

Both front ends produce a tree of modules, some of which own a ``torch.fx.Graph``:
torch.fx gives one flat ``GraphModule``; torch.export + ``unflatten`` gives an
``UnflattenedModule`` whose submodules are ``InterpreterModule`` objects, each with its own
graph. Passes and the renderer only use the functions here, so they never care which front
end produced a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = [
    "CallSite",
    "graph_modules",
    "qualified",
    "call_sites",
    "recompile",
    "surgery_meta",
]


def qualified(prefix: str, target: str) -> str:
    """Join a module prefix and a dotted target into one qualified module name."""
    return f"{prefix}.{target}" if prefix and target else (prefix or target)


def graph_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of ``model`` that owns an fx graph, with its qualified name.

    Returns:
        ``[(prefix, module)]`` in ``named_modules`` order; ``prefix`` is ``""`` for the root.
    """
    out = []
    for name, mod in model.named_modules(remove_duplicate=False):
        graph = getattr(mod, "graph", None)
        if isinstance(graph, fx.Graph):
            out.append((name, mod))
    return out


@dataclass(frozen=True)
class CallSite:
    """One ``call_module`` node and where it lives.

    Attributes:
        qname: qualified name of the called module (from the model root).
        prefix: qualified name of the module that owns the graph holding ``node``.
        owner: that module (``GraphModule`` or ``InterpreterModule``).
        node: the ``call_module`` node; ``node.target`` is relative to ``owner``.
    """

    qname: str
    prefix: str
    owner: nn.Module
    node: fx.Node


def iter_call_sites(model: nn.Module) -> Iterator[CallSite]:
    """Yield every ``call_module`` node of every graph of ``model``, in graph order."""
    for prefix, owner in graph_modules(model):
        for node in owner.graph.nodes:
            if node.op == "call_module":
                yield CallSite(qualified(prefix, str(node.target)), prefix, owner, node)


def call_sites(model: nn.Module) -> dict[str, list[CallSite]]:
    """Map each called module's qualified name to its call sites (more than one if shared)."""
    sites: dict[str, list[CallSite]] = {}
    for site in iter_call_sites(model):
        sites.setdefault(site.qname, []).append(site)
    return sites


def surgery_meta(node: fx.Node) -> dict | None:
    """The provenance a pass left on an inserted node, or ``None`` for an original node.

    Inserted nodes carry ``node.meta["surgery"] = {"pass": ..., "site": ..., "role": ...,
    "adapter": ...}``.
    """
    return node.meta.get("surgery")


def recompile(model: nn.Module) -> None:
    """Lint every graph of ``model`` and regenerate its code.

    ``InterpreterModule`` objects (torch.export + ``unflatten``) need their graph's
    ``owning_module`` pointed back at them and ``finalize()`` run again; plain
    ``GraphModule`` objects need ``recompile()``.

    Raises:
        RuntimeError: from ``Graph.lint`` when an edit left the graph inconsistent.
    """
    for _, mod in graph_modules(model):
        graph: fx.Graph = mod.graph
        if isinstance(mod, fx.GraphModule):
            graph.lint()
            mod.recompile()
        elif hasattr(mod, "finalize"):
            graph.owning_module = mod
            graph.lint()
            mod.finalize()


def is_interpreter_module(mod: nn.Module) -> bool:
    """True for the per-submodule graph holders that ``torch.export.unflatten`` creates."""
    from torch.export.unflatten import InterpreterModule

    return isinstance(mod, InterpreterModule)


def node_value(node: fx.Node) -> torch.Tensor | None:
    """The example value recorded on a node (fake tensor from export, or shape propagation)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return val if isinstance(val, torch.Tensor) else None

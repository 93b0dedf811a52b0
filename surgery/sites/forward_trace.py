"""Tracing one module's own ``forward`` for its site graph.

A module is traced with torch.fx, its children that adapters attach to (and site graphs
already there) kept as calls. A linear layer of ``torch.nn`` or transformers' ``Conv1D`` is
traced once per kind and its graph reused (a 32-layer model has 64 identical ``q_proj`` /
``v_proj`` forwards). Any other module is traced in ``train()`` and in ``eval()``: where the
two differ only by constants its forward picks by ``self.training`` (a dropout probability,
a ``training=`` flag), the graph reads them at run time through :func:`by_mode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from surgery.errors import UnsupportedSiteError

__all__ = ["by_mode", "trace_forward"]


class _SiteTracer(fx.Tracer):
    """Traces one module's ``forward``; children that are leaves to the map stay calls."""

    def __init__(self, leaf: Any) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_once(module: nn.Module, leaf: Any) -> fx.Graph:
    tracer = _SiteTracer(leaf)
    graph = tracer.trace(module)
    for node in graph.nodes:
        if isinstance(node.type, str):  # a postponed annotation cannot be pickled
            node.type = None
    return graph


def by_mode(training: bool, when_training: Any, when_eval: Any) -> Any:
    """``when_training`` if ``training`` else ``when_eval``: a value a module's forward
    chooses by ``self.training`` (``dropout_p=self.p if self.training else 0.0``), read at
    run time in a site graph."""
    return when_training if training else when_eval


def _merge_modes(g_train: fx.Graph, g_eval: fx.Graph) -> bool:
    """Make ``g_eval`` compute what the module computes in either mode, if it can.

    The two traces (in ``train()`` and in ``eval()``) must have the same nodes; where an
    argument differs only by a constant (a dropout probability, ``training=True`` against
    ``False``), ``g_eval`` gets :func:`by_mode` of ``self.training`` there. Returns ``False``
    when the traces differ otherwise (the forward chooses what to compute by mode).
    """
    if g_train.python_code("self").src == g_eval.python_code("self").src:
        return True
    nodes_t, nodes_e = list(g_train.nodes), list(g_eval.nodes)
    if len(nodes_t) != len(nodes_e) or any(
            (a.op, a.target, a.name) != (b.op, b.target, b.name) for a, b in zip(nodes_t, nodes_e)):
        return False
    mapping = {a: b for a, b in zip(nodes_t, nodes_e)}
    constant = (bool, int, float, type(None))

    def merge(t: Any, e: Any) -> Any:
        if isinstance(t, fx.Node) and isinstance(e, fx.Node):
            return e if mapping.get(t) is e else _MISMATCH
        if isinstance(t, (tuple, list)) and type(t) is type(e) and len(t) == len(e):
            parts = [merge(x, y) for x, y in zip(t, e)]
            return _MISMATCH if _MISMATCH in parts else type(t)(parts)
        if isinstance(t, dict) and isinstance(e, dict) and t.keys() == e.keys():
            parts = {k: merge(t[k], e[k]) for k in t}
            return _MISMATCH if _MISMATCH in parts.values() else parts
        if t == e and type(t) is type(e):
            return e
        if isinstance(t, constant) and isinstance(e, constant):
            return _ModeValue(t, e)
        return _MISMATCH

    merged = []
    for a, b in zip(nodes_t, nodes_e):
        args, kwargs = merge(a.args, b.args), merge(a.kwargs, b.kwargs)
        if args is _MISMATCH or kwargs is _MISMATCH:
            return False
        merged.append((b, args, kwargs))
    last_placeholder = [n for n in nodes_e if n.op == "placeholder"][-1:]
    with (g_eval.inserting_after(last_placeholder[0]) if last_placeholder
          else g_eval.inserting_before(nodes_e[0])):
        training = g_eval.get_attr("training")

    def resolve(value: Any, user: fx.Node) -> Any:
        if isinstance(value, _ModeValue):
            with g_eval.inserting_before(user):
                return g_eval.call_function(by_mode, (training, value.train, value.eval))
        if isinstance(value, (tuple, list)):
            return type(value)(resolve(v, user) for v in value)
        if isinstance(value, dict):
            return {k: resolve(v, user) for k, v in value.items()}
        return value

    for node, args, kwargs in merged:
        node.args, node.kwargs = resolve(args, node), resolve(kwargs, node)
    return True


class _ModeValue:
    """A constant that differs between the train and the eval trace."""

    def __init__(self, train: Any, eval_: Any) -> None:
        self.train, self.eval = train, eval_


_MISMATCH = object()

# Traced graphs of the layers adapters attach to, by :func:`_layer_key`: every
# ``nn.Linear(64, 64)`` has the same forward, traced once.
_LAYER_GRAPHS: dict[tuple, fx.Graph] = {}


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` node for node (metadata copied shallowly): cheaper than
    ``copy.deepcopy`` for the small graphs of single layers."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    value, output = new.graph_copy(graph, {}, return_output_node=True)
    new.output(value, type_expr=getattr(output, "type", None))
    return new


def _layer_key(module: nn.Module) -> tuple | None:
    """A key under which ``module``'s traced forward can be reused, or ``None``.

    Only for linear-like layers of ``torch.nn`` and transformers' ``Conv1D``, whose forward
    reads nothing but the module's own attributes (never ``self.training``): the key is the
    class, which tensors are present, and every plain attribute (sizes, strides, ``nf``).
    """
    from surgery.map.leaves import is_linear_like

    cls = type(module)
    if not is_linear_like(module) or module._modules:
        return None
    if not (cls.__module__.startswith("torch.nn.") or cls.__module__.startswith("transformers")):
        return None
    attrs = []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training":
            continue
        if not isinstance(v, (int, float, str, bool, tuple, type(None))):
            return None
        attrs.append((k, v))
    present = tuple((k, v is None) for k, v in module._parameters.items())
    buffers = tuple((k, v is None) for k, v in module._buffers.items())
    return (cls, present, buffers, tuple(attrs))


def trace_forward(module: nn.Module, site: str, *, who: str,
                  leaf: Callable[[nn.Module], bool]) -> fx.Graph:
    """The graph of ``module``'s own ``forward``, in either training mode.

    Args:
        module: the module (not changed; its training flag is put back).
        site: its qualified name, for messages.
        who: the pass asking, for messages.
        leaf: ``leaf(child) -> bool``, children kept as ``call_module`` nodes (besides the
            modules of ``torch.nn``, which torch.fx keeps anyway).

    Raises:
        UnsupportedSiteError: torch.fx cannot trace the forward, or the forward picks what
            to compute by ``self.training``.
    """
    kind = type(module).__name__
    was_training = module.training
    key = _layer_key(module)
    try:
        if key is not None:  # a layer whose forward reads nothing but its own attributes
            if key not in _LAYER_GRAPHS:
                _LAYER_GRAPHS[key] = _trace_once(module, leaf)
            graph = _copy_graph(_LAYER_GRAPHS[key])
        else:
            module.train(True)
            g_train = _trace_once(module, leaf)
            module.train(False)
            graph = _trace_once(module, leaf)
    except Exception as exc:  # any failure inside the module's own code while tracing
        raise UnsupportedSiteError(
            f"{who}: {site or 'the model'} ({kind}) cannot be turned into a site graph: "
            f"torch.fx cannot trace its forward ({type(exc).__name__}: {exc}). Way out: "
            f"select the layers inside it instead (pattern='{site + '.' if site else ''}*'), "
            f"see surgery.list_targets(model).") from exc
    finally:
        module.train(was_training)
    if key is None and not _merge_modes(g_train, graph):
        raise UnsupportedSiteError(
            f"{who}: {site or 'the model'} ({kind}) computes something different in train() "
            f"and eval() inside its own forward (it reads self.training to choose what to "
            f"compute, not only a value such as a dropout probability), so a traced site graph "
            f"would freeze one mode. Way out: select the layers inside it instead "
            f"(pattern='{site + '.' if site else ''}*').")
    return graph

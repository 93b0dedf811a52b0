"""Site graphs: the unit of rewrite, installed inside the user's own module tree.

A *site* is one module of the user's model that a pass adapts (a linear layer, a named
sub-layer such as ``mlp``, an attention module). Its site graph is the module's own
``forward`` traced with torch.fx, as a :class:`SiteGraph` (a ``torch.fx.GraphModule``)
installed at the site's qualified name in place of the module. Before any pass, for an
``nn.Linear`` at ``layers.0.attn.q_proj``::

    def forward(self, input):
        weight = self.weight
        bias = self.bias
        linear = torch._C._nn.linear(input, weight, bias)
        return linear

Passes then insert their nodes (LoRA's ``lora_A → lora_B → × scaling → +``, an IA³
multiply, a bottleneck branch) into this small graph, tagged ``node.meta["surgery"]``.
Everything else about the model stays the user's: class, methods, calling convention.

Invariants kept here:

* **Keys.** The site graph holds the module's own parameters and buffers under their own
  names (``q_proj.weight`` stays ``q_proj.weight``) and every child module, called or not,
  under its name, so every state-dict key of the user's model is unchanged. Adapters
  register under the site (``q_proj.lora_A.default.weight``).
* **Weights are shared.** The site graph holds the very ``Parameter`` objects of the module
  it replaces (themselves sharing the caller's storage, see :mod:`surgery.sites.params`).
* **Training behaviour.** Dropout and normalisation layers stay modules (they switch with
  ``train()``/``eval()``). A value the module's own forward picks by ``self.training``
  (``F.dropout(x, p, self.training)``, ``dropout_p=p if self.training else 0.0``) is read
  at run time (:func:`by_mode`); a forward that picks *what to compute* by mode is refused,
  since a trace would freeze one mode.
* **Copies.** ``copy.deepcopy`` and ``pickle`` keep the graph, node tags, adapters and the
  template (a weight-free copy of the original module, from which :func:`plain_module`
  rebuilds it for ``unload``).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from surgery.errors import UnsupportedSiteError
from surgery.map.wrappers import is_compiled
from surgery.sites.forward_trace import by_mode, trace_forward

__all__ = [
    "SiteGraph",
    "base_module",
    "by_mode",  # re-exported: site graphs call it
    "deferred_code",
    "install",
    "is_site_graph",
    "make_site_graph",
    "plain_weight_free",
    "recompile_sites",
    "module_aliases",
    "plain_module",
    "site_graph_at",
    "site_graphs",
]

_deferring = 0  # > 0 inside :func:`deferred_code`


@contextmanager
def deferred_code() -> Iterator[None]:
    """Inside this block, a site graph made or given a new graph does not generate its code
    at once: the code is generated at :func:`recompile_sites`, at the first call, or when
    ``.code`` is read, whichever comes first. :func:`surgery.apply.apply_passes` runs its
    passes inside it, so a site graph built and rewritten in one pass generates its code once
    (codegen is most of the time it takes to adapt a layer)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


# ``GraphModule`` attributes that hold generated code or the graph itself; everything else
# of a site graph's ``__dict__`` is its state (modules, parameters, buffers, flags, tags).
_CODE_KEYS = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start"})


def _plain_meta(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` keeping only picklable node metadata (the ``surgery*`` tags)."""
    out = copy.deepcopy(graph)
    for node in out.nodes:
        node.meta = {k: v for k, v in node.meta.items() if k.startswith("surgery")}
    out._owning_module = None
    return out


def _rebuild(state: dict[str, Any], graph: fx.Graph) -> SiteGraph:
    """Inverse of :meth:`SiteGraph.__reduce__` / the core of its ``__deepcopy__``."""
    res = SiteGraph.__new__(SiteGraph)
    res.__dict__.update(state)
    res.graph = graph  # sets the owning module and regenerates the code
    return res


class SiteGraph(fx.GraphModule):
    """One adapted module as a small fx graph, installed where the module was.

    Attributes:
        site: the qualified name of the site in the model (``"layers.0.attn.q_proj"``;
            ``""`` for a model that is itself one layer).
        template: a weight-free (meta-device) copy of the module the site graph replaced,
            not registered as a submodule; :func:`plain_module` binds it to the site
            graph's tensors to put a plain module back.
        base_output: name of the node that carries the base module's result.

    Do not construct directly: :func:`make_site_graph` traces a module,
    :func:`site_graph_at` gets or installs the site graph at a qualified name.
    """

    site: str
    template: nn.Module
    base_output: str

    def recompile(self) -> Any:
        """Generate the code from the graph, as ``GraphModule.recompile`` does; inside
        :func:`deferred_code`, only mark it stale (it is generated before it is needed)."""
        if _deferring:
            type(self).forward = SiteGraph._codegen_then_forward
            return None
        return super().recompile()

    def _codegen_then_forward(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` while the code is stale: generate it, then run it (hooks run once,
        around this call)."""
        fx.GraphModule.recompile(self)
        return self.forward(*args, **kwargs)

    @property
    def code_is_stale(self) -> bool:
        """True while the code has not been generated from the current graph."""
        return type(self).forward is SiteGraph._codegen_then_forward

    @property
    def code(self) -> str:
        """The Python code generated from the graph (generated now if stale)."""
        if self.code_is_stale:
            fx.GraphModule.recompile(self)
        return super().code

    def __str__(self) -> str:
        if self.code_is_stale:
            fx.GraphModule.recompile(self)
        return super().__str__()

    def __deepcopy__(self, memo: dict[int, Any]) -> SiteGraph:
        state = {k: v for k, v in self.__dict__.items() if k not in _CODE_KEYS}
        res = SiteGraph.__new__(SiteGraph)
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(state, memo))
        res.graph = copy.deepcopy(self.graph, memo)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k not in _CODE_KEYS}
        return (_rebuild, (state, _plain_meta(self.graph)))

    def __copy__(self) -> SiteGraph:
        state = {k: v for k, v in self.__dict__.items() if k not in _CODE_KEYS}
        return _rebuild(dict(state), copy.deepcopy(self.graph))

    @property
    def input_node(self) -> fx.Node:
        """The first placeholder: the site's input ``x``."""
        return next(n for n in self.graph.nodes if n.op == "placeholder")

    @property
    def base_node(self) -> fx.Node:
        """The node carrying the base module's result (before any inserted node)."""
        return next(n for n in self.graph.nodes if n.name == self.base_output)

    @property
    def output_node(self) -> fx.Node:
        """The graph's ``output`` node."""
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def extra_repr(self) -> str:
        return f"site={self.site!r}, base={type(self.template).__name__}"


def is_site_graph(module: nn.Module) -> bool:
    """True for a :class:`SiteGraph`."""
    return isinstance(module, SiteGraph)


def base_module(module: nn.Module) -> nn.Module:
    """The module a pass should judge by type and shape: the template of a site graph (a
    weight-free copy of the original), or ``module`` itself."""
    return module.template if isinstance(module, SiteGraph) else module


def make_site_graph(module: nn.Module, site: str, *, who: str,
                    leaf: Any = None, tracer: Any = None) -> SiteGraph:
    """Trace ``module``'s own ``forward`` into a :class:`SiteGraph` that replaces it.

    Args:
        module: the module to replace (``nn.Linear``, transformers' ``Conv1D``, an ``mlp``
            block, an attention module). It is not changed.
        site: its qualified name in the model, for messages and tags.
        who: the pass asking, named in errors (``"LoRAPass"``).
        leaf: ``leaf(child) -> bool``, children kept as ``call_module`` nodes besides the
            ones torch.fx keeps (modules of ``torch.nn``); by default the layers adapters
            attach to (:func:`surgery.map.leaves.is_leaf_type`).
        tracer: ``tracer(module, site) -> fx.Graph``, a graph to use instead of the trace of
            the module's own ``forward`` (a forward the module dispatches to, traced with
            its library's kernels kept as calls); it must compute what the module computes
            and not depend on ``self.training``.

    Returns:
        A site graph that computes exactly what ``module`` computes (bitwise: the same
        operations in the same order), holding the same parameter, buffer and child
        objects under the same names, and the module's plain attributes
        (``in_features``, ...).

    Raises:
        UnsupportedSiteError: torch.fx cannot trace the module's ``forward``, or its code
            reads ``self.training`` (a trace would freeze the mode).
    """
    from surgery.map.leaves import is_leaf_type

    user_leaf = leaf or is_leaf_type
    kind = type(module).__name__
    was_training = module.training
    graph = tracer(module, site) if tracer is not None else trace_forward(
        module, site, who=who, leaf=lambda m: isinstance(m, SiteGraph) or user_leaf(m))
    sg = SiteGraph(module, graph, class_name=kind)
    # Keep every child, parameter and buffer, called or not, as the very same objects.
    for name, child in module._modules.items():
        sg._modules[name] = child
    for name, param in module._parameters.items():
        sg._parameters[name] = param
    for name, buf in module._buffers.items():
        sg._buffers[name] = buf
    sg._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for key, val in vars(module).items():  # plain attributes other code may read
        if not key.startswith("_") and key != "training" and key not in sg.__dict__:
            sg.__dict__[key] = val
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(sg, hooks).update(getattr(module, hooks))
    sg.train(was_training)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    result = out.args[0]
    if not isinstance(result, fx.Node):
        raise UnsupportedSiteError(
            f"{who}: {site or 'the model'} ({kind}) returns {type(result).__name__}, not one "
            f"tensor; a site must return one tensor. Way out: select the layers inside it "
            f"(pattern='{site + '.' if site else ''}*').")
    sg.__dict__["site"] = site
    sg.__dict__["template"] = _weight_free(module)
    sg.__dict__["base_output"] = result.name
    return sg


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _weight_free(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors are on the meta device (no storage) and that
    carries no hooks; children that are site graphs read as their templates.

    A shallow copy per module (plain attributes are shared with ``module``, never written:
    a template is read, copied or rebuilt, never run).
    """
    if isinstance(module, SiteGraph):
        return module.template
    if is_compiled(module):  # its attribute writes land on the module it wraps: copy that
        return _weight_free(module._modules["_orig_mod"])
    new = copy.copy(module)
    new._parameters = {k: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"),
                                                               p.requires_grad)
                       for k, p in module._parameters.items()}
    new._buffers = {k: None if b is None else torch.empty_like(b, device="meta")
                    for k, b in module._buffers.items()}
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = {k: None if m is None else _weight_free(m) for k, m in module._modules.items()}
    for hooks in _HOOK_DICTS:
        if hooks in module.__dict__:
            new.__dict__[hooks] = type(module.__dict__[hooks])()
    return new


def plain_weight_free(model: nn.Module) -> nn.Module:
    """A weight-free (meta-device) copy of ``model`` as the user wrote it: every site graph
    reads as the module it replaced. What the map is traced from (the map deep-copies it
    again before changing anything)."""
    return _weight_free(model)


def module_aliases(model: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name under which ``module`` sits in ``model`` (several when shared)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def install(model: nn.Module, names: Collection[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at every qualified name in ``names``; return the model root.

    The root itself (name ``""``) cannot be replaced inside a parent: the returned root is
    then ``new``.
    """
    root = model
    for qname in names:
        if qname == "":
            root = new
            continue
        parent_name, _, leaf = qname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[leaf] = new
    return root


def site_graph_at(model: nn.Module, qname: str, *, who: str, leaf: Any = None,
                  aliases: Collection[str] | None = None,
                  tracer: Any = None) -> tuple[nn.Module, SiteGraph]:
    """The site graph at ``qname``, made and installed first if the module there is plain.

    Args:
        aliases: every name the module sits under, when the caller knows them
            (:attr:`surgery.targets.Site.aliases`); found by walking the model otherwise.
        tracer: see :func:`make_site_graph` (used only when the site graph is made here).

    Returns:
        ``(root, site_graph)``: the model root (``model`` itself, unless ``qname`` is the
        root, which the site graph then replaces) and the site graph, installed at every
        name the module had (a module shared under two names gets one site graph).

    Raises:
        UnsupportedSiteError: from :func:`make_site_graph`.
    """
    module = model.get_submodule(qname) if qname else model
    if isinstance(module, SiteGraph):
        return model, module
    sg = make_site_graph(module, qname, who=who, leaf=leaf, tracer=tracer)
    names = list(aliases) if aliases else (module_aliases(model, module) or [qname])
    return install(model, names, sg), sg


def site_graphs(model: nn.Module) -> Iterator[tuple[str, SiteGraph]]:
    """Every site graph of ``model`` with its qualified name (first name of a shared one)."""
    for qname, mod in model.named_modules():
        if isinstance(mod, SiteGraph):
            yield qname, mod


def plain_module(sg: SiteGraph) -> nn.Module:
    """The plain module a site graph stands for, over the site graph's own tensors.

    A copy of the template whose parameters and buffers are the site graph's objects (same
    names), and whose children are the site graph's children (themselves made plain when they
    are site graphs). Adapters are not carried over; a merged weight is carried as it is.
    """
    plain = copy.deepcopy(sg.template)
    for name in list(plain._parameters):
        plain._parameters[name] = sg._parameters.get(name)
    for name in list(plain._buffers):
        plain._buffers[name] = sg._buffers.get(name)
    for name in list(plain._modules):
        child = sg._modules.get(name)
        plain._modules[name] = plain_module(child) if isinstance(child, SiteGraph) else child
    plain.train(sg.training)
    return plain


def recompile_sites(model: nn.Module, sites: Collection[str]) -> None:
    """Lint and regenerate the code of the site graphs at ``sites`` (qualified names), and of
    site graphs nested in them; names that are not site graphs are skipped.

    Raises:
        RuntimeError: from ``Graph.lint`` when an edit left a graph inconsistent.
    """
    done: set[int] = set()
    for qname in sites:
        try:
            module = model.get_submodule(qname) if qname else model
        except AttributeError:
            continue
        for sub in module.modules():
            if isinstance(sub, SiteGraph) and id(sub) not in done:
                done.add(id(sub))
                sub.graph.lint()
                fx.GraphModule.recompile(sub)

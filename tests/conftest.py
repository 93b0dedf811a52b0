"""Shared fixtures: zoo models and their traced forms, built once per session, and a
snapshot that says whether a model was changed in any way.

Models handed out by :class:`Zoo` are shared between tests: never change them. Adapt them
with ``apply_passes`` (which leaves its input alone; that is one of the invariants under
test) or ask for a ``fresh`` copy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import surgery  # noqa: F401  (the facade imports the passes; importing passes.* first is circular)

try:  # hypothesis profiles: "ci" by default, "deep" with --hypothesis-profile=deep
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                                   print_blob=True)
    _hyp_settings.register_profile("deep", max_examples=400, deadline=None)
    _hyp_settings.load_profile("ci")  # the plugin loads --hypothesis-profile=NAME after this
except ImportError:  # hypothesis is a test extra; tests that use it import it themselves
    pass

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--zoo=sample`` (default): the transformers zoo tests run a sample of architectures;
    ``--zoo=all`` runs every architecture (as does ``-m zoo``); ``--zoo=gpt2,t5`` names them."""
    parser.addoption("--zoo", default="sample",
                     help="transformers zoo architectures: sample (default), all, or a "
                          "comma-separated list of model types")


class Zoo:
    """Session cache of :func:`surgery.zoo.load_model` specs and their maps."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}
        self._traced: dict[str, nn.Module] = {}

    def spec(self, name: str) -> Any:
        """The shared :class:`surgery.zoo.ModelSpec` of ``name`` (seed 0, eval mode)."""
        if name not in self._specs:
            self._specs[name] = self.fresh(name)
        return self._specs[name]

    def fresh(self, name: str) -> Any:
        """A new spec of ``name``, owned by the caller."""
        if name.startswith("hf:") and not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed")
        from surgery.zoo import load_model

        return load_model(name)

    def traced(self, name: str) -> nn.Module:
        """The shared map of ``name`` (:func:`surgery.trace`: fx or export, weight-free);
        for analysis only, never run as a model."""
        if name not in self._traced:
            from surgery.map.trace import trace

            spec = self.spec(name)
            self._traced[name] = trace(spec.model, spec.example_inputs, spec.example_kwargs or None)
        return self._traced[name]


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Every test runs torch on one intra-op thread, the previous setting restored after
    the session: the test models are so small that a second thread only adds
    synchronisation."""
    from helpers import torch_threads  # after surgery: helpers import passes

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    """The session's model cache (see :class:`Zoo`)."""
    return Zoo()


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: the tensor itself, ``.logits`` or element 0."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


@pytest.fixture(scope="session")
def run_model() -> Callable[..., torch.Tensor]:
    """``run_model(model, spec_or_inputs)``: the model's main output tensor."""

    def run(model: nn.Module, spec: Any, *, args: tuple | None = None,
            kwargs: dict | None = None) -> torch.Tensor:
        a = spec.example_inputs if args is None else args
        k = (spec.example_kwargs or {}) if kwargs is None else kwargs
        return first_tensor(model(*a, **k))

    return run


@dataclass
class ModelSnapshot:
    """Everything observable about a module tree, to check that nothing changed.

    Values are cloned, so a write into shared storage is caught; parameter objects and
    module objects are kept, so a swap is caught too.
    """

    params: dict[str, tuple[nn.Parameter, torch.Tensor, bool, int]]
    buffers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    modules: dict[str, tuple[nn.Module, type, bool]]
    graphs: dict[str, str]
    history: int | None

    @classmethod
    def of(cls, model: nn.Module) -> ModelSnapshot:
        params = {n: (p, p.detach().clone(), p.requires_grad, p.data_ptr())
                  for n, p in model.named_parameters(remove_duplicate=False)}
        buffers = {n: (b, b.detach().clone()) for n, b in model.named_buffers(remove_duplicate=False)}
        modules = {n: (m, type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)}
        graphs = {n: str(m.graph) for n, m in model.named_modules(remove_duplicate=False)
                  if isinstance(getattr(m, "graph", None), torch.fx.Graph)}
        state = getattr(model, "_surgery", None)
        return cls(params, buffers, modules, graphs, len(state.history) if state else None)

    def assert_unchanged(self, model: nn.Module) -> None:
        """Fail naming the first thing that differs from the snapshot."""
        after = ModelSnapshot.of(model)
        assert list(after.modules) == list(self.modules), "submodule names changed"
        for name, (mod, typ, training) in self.modules.items():
            mod2, typ2, training2 = after.modules[name]
            assert mod2 is mod, f"submodule {name!r} was replaced"
            assert typ2 is typ, f"submodule {name!r} changed type"
            assert training2 == training, f"training flag of {name!r} changed"
        assert list(after.params) == list(self.params), "parameter names changed"
        for name, (param, value, flag, ptr) in self.params.items():
            param2 = after.params[name][0]
            assert param2 is param, f"parameter {name!r} was replaced"
            assert param.requires_grad == flag, f"requires_grad of {name!r} changed"
            assert param.data_ptr() == ptr, f"storage of {name!r} changed"
            assert torch.equal(param.detach(), value), f"value of {name!r} changed"
            assert param.grad is None, f"{name!r} got a .grad"
        assert list(after.buffers) == list(self.buffers), "buffer names changed"
        for name, (buf, value) in self.buffers.items():
            assert after.buffers[name][0] is buf, f"buffer {name!r} was replaced"
            assert torch.equal(buf, value), f"buffer {name!r} changed"
        assert after.graphs == self.graphs, "a graph changed"
        assert after.history == self.history, "the pass history changed"


@pytest.fixture(scope="session")
def snapshot() -> Callable[[nn.Module], ModelSnapshot]:
    """``snapshot(model)`` records a model; ``.assert_unchanged(model)`` checks it later."""
    return ModelSnapshot.of


@pytest.fixture
def no_mha_fastpath() -> Any:
    """Turn off the fused ``nn.MultiheadAttention`` kernels for one test.

    Eager ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` switch to fused kernels
    in evaluation mode when nothing requires a gradient; those agree with the ordinary path
    only to about 1e-7, so bitwise comparisons need them off on both sides.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)

"""Hypothesis strategies for pipelines: sequences of steps run on a drawn model.

A step is one ``apply_passes`` call with one or two passes drawn from every pass (LoRA with
its rank / alpha / dropout / rsLoRA / DoRA / init / bias options, IA³, serial and parallel
bottleneck adapters, prefixes, trained modules, LoRA and IA³ merge and unmerge), or one
adapter operation (``set_active``, ``combine_adapters``, ``delete_adapter``, a
``save_adapters`` / ``load_adapters`` round trip). Settings are valid or not: a pass built
with a setting its constructor refuses is marked ``invalid`` (a ``ConfigError`` naming the
pass is expected at construction); selections that name nothing expect a ``NoMatchError``
when run. Names for patterns come from the drawn model (:class:`~properties.models.ModelCase`),
so most steps select something real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

import surgery
from properties.models import ModelCase

__all__ = ["ADAPTER_NAMES", "MISSING", "PRESENT", "PassSpec", "Step", "pipelines"]

ADAPTER_NAMES = ("default", "a", "b")
"""The adapter names pipelines draw (a small pool, so that names meet again)."""

MISSING = "nowhere_xyz"
"""A module name no drawn model has."""

PRESENT = "<present>"
"""In a step's arguments: the adapters the model carries when the step runs (for
``combine``: up to two LoRA adapters, the weights given as a list; for ``delete``: the
first adapter), so that operations meet real adapters as well as missing ones."""


@dataclass(frozen=True)
class PassSpec:
    """A pass class name and its keyword arguments; ``invalid`` when the constructor must
    refuse them (``ConfigError``)."""

    cls: str
    kwargs: tuple[tuple[str, Any], ...]
    invalid: bool = False

    def build(self) -> surgery.Pass:
        """The pass (raises ``ConfigError`` for invalid settings)."""
        return getattr(surgery, self.cls)(**dict(self.kwargs))

    def get(self, key: str, default: Any = None) -> Any:
        """One keyword argument."""
        return dict(self.kwargs).get(key, default)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.cls}({args}){' [invalid]' if self.invalid else ''}"


@dataclass(frozen=True)
class Step:
    """One step: ``op`` is ``"apply"`` (``passes``, ``with_inputs``), ``"set_active"``,
    ``"combine"``, ``"delete"`` or ``"save_load"`` (``args``)."""

    op: str
    passes: tuple[PassSpec, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)
    with_inputs: bool = True
    expect: type[Exception] | None = None  # an error the step must raise

    def __repr__(self) -> str:
        what = list(self.passes) if self.op == "apply" else self.args
        extra = "" if self.with_inputs else ", no example inputs"
        exp = f", expects {self.expect.__name__}" if self.expect else ""
        return f"{self.op}({what}{extra}{exp})"


def _spec(cls: str, **kwargs: Any) -> PassSpec:
    return PassSpec(cls, tuple(kwargs.items()))


def _bad(cls: str, **kwargs: Any) -> PassSpec:
    return PassSpec(cls, tuple(kwargs.items()), invalid=True)


@st.composite
def _pattern(draw: st.DrawFn, names: list[str], globs: list[str]) -> Any:
    """A pattern selecting some of ``names``: one name, a list, a glob, or a missing one."""
    choices: list[st.SearchStrategy[Any]] = [st.just(MISSING)]  # one branch in about six
    if names:
        choices += [st.sampled_from(names)] * 2 + [
            st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)]
    if globs:
        choices += [st.sampled_from(globs)] * 2
    return draw(st.one_of(choices))


def _selects_nothing(pattern: Any) -> bool:
    return pattern == MISSING


def _globs(case: ModelCase) -> list[str]:
    if case.kind == "transformer":
        return ["*_proj", "attn.*", "mlp.*", "blocks.0.**", "re:.*\\.(q|v)_proj"]
    if case.kind == "cnn":
        return ["convs.*"]
    return ["layers.*"]


@st.composite
def lora_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``LoRAPass`` with every option; about one in six refused at construction."""
    name = draw(st.sampled_from(ADAPTER_NAMES))
    if draw(st.integers(0, 5)) == 0:
        key, val = draw(st.sampled_from([
            ("rank", 0), ("rank", -2), ("rank", 2.5), ("alpha", 0), ("alpha", float("nan")),
            ("dropout", 1.0), ("dropout", -0.1), ("init", "loftq"), ("init", "kaimng"),
            ("bias", "some"), ("use_rslora", "yes"), ("name", "a.b"), ("name", ""),
            ("pattern", 3)]))
        return _bad("LoRAPass", **{"name": name, key: val})
    layers = case.linears + case.convs + case.embeddings
    kw: dict[str, Any] = {"name": name}
    if case.kind != "transformer" or draw(st.integers(0, 3)):
        kw["pattern"] = draw(_pattern(layers, _globs(case)))
    kw["rank"] = draw(st.sampled_from([1, 2, 4]))
    kw["alpha"] = draw(st.sampled_from([1.0, 4.0, 16.0]))
    kw["dropout"] = draw(st.sampled_from([0.0, 0.0, 0.1]))
    kw["use_rslora"] = draw(st.booleans())
    kw["use_dora"] = draw(st.integers(0, 4)) == 0
    inits = ["kaiming", "gaussian"]
    if not kw["use_dora"]:
        inits += ["orthogonal", "random", "pissa", "pissa_niter_2", "olora"]
    kw["init"] = draw(st.sampled_from(inits))
    if kw["init"] == "orthogonal":
        kw["rank"] = 2 * kw["rank"]
    kw["bias"] = draw(st.sampled_from(["none", "none", "lora_only", "all"]))
    return _spec("LoRAPass", **kw)


@st.composite
def ia3_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``IA3Pass`` by role (transformers) or by pattern, with ``feedforward`` / ``fused``."""
    name = draw(st.sampled_from(ADAPTER_NAMES))
    if draw(st.integers(0, 7)) == 0:
        return _bad("IA3Pass", name=name, fused=draw(st.sampled_from(["kv", "none", 1])))
    kw: dict[str, Any] = {"name": name, "fused": draw(st.sampled_from(["key_value", "all"]))}
    if case.kind != "transformer" or draw(st.booleans()):
        layers = case.linears + [c for c in case.convs]
        kw["pattern"] = draw(_pattern(layers, _globs(case)))
        kw["feedforward"] = draw(st.one_of(st.just([]), st.none(),
                                           _pattern(layers, _globs(case))))
    return _spec("IA3Pass", **kw)


@st.composite
def serial_adapter_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``SerialAdapterPass`` by placement, pattern (layers or sub-layers) or role."""
    name = draw(st.sampled_from(ADAPTER_NAMES))
    if draw(st.integers(0, 7)) == 0:
        key, val = draw(st.sampled_from([("bottleneck", 0), ("reduction_factor", 0),
                                         ("activation", "swish2"), ("placement", "middle")]))
        return _bad("SerialAdapterPass", **{"name": name, key: val})
    kw: dict[str, Any] = {"name": name, "activation": draw(st.sampled_from(
        ["gelu", "relu", "silu", "tanh"]))}
    width = draw(st.sampled_from(["bottleneck", "reduction_factor", "default"]))
    if width == "bottleneck":
        kw["bottleneck"] = draw(st.integers(1, 4))
    elif width == "reduction_factor":
        kw["reduction_factor"] = draw(st.sampled_from([1, 2, 4]))
    how = draw(st.sampled_from(["placement", "pattern", "role"]))
    if how == "placement":
        kw["placement"] = draw(st.sampled_from(["houlsby", "pfeiffer"]))
    elif how == "pattern":
        kw["pattern"] = draw(_pattern(case.linears + case.sublayers, _globs(case)))
    else:
        kw["role"] = draw(st.sampled_from(["attn_out", "ffn_down", "query"]))
    return _spec("SerialAdapterPass", **kw)


@st.composite
def parallel_adapter_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``ParallelAdapterPass`` by role, pattern, or both."""
    name = draw(st.sampled_from(ADAPTER_NAMES))
    if draw(st.integers(0, 7)) == 0:
        key, val = draw(st.sampled_from([("scaling", float("inf")), ("bottleneck", -1),
                                         ("activation", "nope")]))
        return _bad("ParallelAdapterPass", **{"name": name, key: val})
    kw: dict[str, Any] = {"name": name, "scaling": draw(st.sampled_from([4.0, 1.0, -0.5])),
                          "activation": draw(st.sampled_from(["relu", "gelu", "silu", "tanh"]))}
    if draw(st.booleans()):
        kw["bottleneck"] = draw(st.integers(1, 4))
    how = draw(st.sampled_from(["default", "role", "pattern"]))
    if how == "role":
        kw["role"] = draw(st.sampled_from(["ffn", "attention"]))
    elif how == "pattern":
        kw["pattern"] = draw(_pattern(case.linears + case.sublayers, _globs(case)))
    return _spec("ParallelAdapterPass", **kw)


@st.composite
def prefix_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``PrefixPass`` in attention mode (gated or not, reparameterised or not) or sequence
    mode."""
    name = draw(st.sampled_from(ADAPTER_NAMES))
    if draw(st.integers(0, 7)) == 0:
        key, val = draw(st.sampled_from([("length", -1), ("gate", "one"), ("mode", "tokens"),
                                         ("init_std", 0.0), ("role", "query")]))
        return _bad("PrefixPass", **{"length": 2, "name": name, key: val})
    kw: dict[str, Any] = {"name": name, "length": draw(st.integers(0, 3))}
    if draw(st.integers(0, 4)) == 0 and case.kind == "transformer":
        kw["mode"] = "sequence"
        kw["pattern"] = draw(st.sampled_from(["blocks.0", "blocks.0.mlp", "blocks"]))
        return _spec("PrefixPass", **kw)
    kw["gate"] = draw(st.sampled_from([None, "zero"]))
    if draw(st.booleans()):
        kw["pattern"] = draw(_pattern(case.attention, ["attn", "blocks.*.attn"]))
    if draw(st.integers(0, 3)) == 0:
        kw["reparameterize"] = True
        kw["reparam_hidden"] = draw(st.integers(1, 8))
    return _spec("PrefixPass", **kw)


@st.composite
def train_module_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """``TrainModulePass`` on named modules holding parameters (or none: refused)."""
    if draw(st.integers(0, 7)) == 0:
        return _bad("TrainModulePass")
    names = [n for n in case.param_modules if "blocks" not in n or "norm" in n]
    return _spec("TrainModulePass", pattern=draw(_pattern(names, [])))


@st.composite
def merge_passes(draw: st.DrawFn, case: ModelCase) -> PassSpec:
    """A merge or unmerge of LoRA or IA³, for every adapter or named ones."""
    cls = draw(st.sampled_from(["MergeLoRAPass", "UnmergeLoRAPass", "MergeIA3Pass",
                                "UnmergeIA3Pass"]))
    if draw(st.integers(0, 9)) == 0:
        return _bad(cls, names=[])
    kw: dict[str, Any] = {}
    if draw(st.booleans()):
        kw["names"] = draw(st.lists(st.sampled_from(ADAPTER_NAMES), min_size=1, max_size=2,
                                    unique=True))
    return _spec(cls, **kw)


def pass_specs(case: ModelCase) -> st.SearchStrategy[PassSpec]:
    """Any pass, drawn for ``case``."""
    return st.one_of(lora_passes(case), ia3_passes(case), serial_adapter_passes(case),
                     parallel_adapter_passes(case), prefix_passes(case),
                     train_module_passes(case), merge_passes(case))


@st.composite
def apply_steps(draw: st.DrawFn, case: ModelCase) -> Step:
    """One ``apply_passes`` call with one or two passes; a first pass whose pattern names
    nothing expects a ``NoMatchError``."""
    specs = tuple(draw(st.lists(pass_specs(case), min_size=1, max_size=2)))
    expect = None
    if _selects_nothing(specs[0].get("pattern")) and not specs[0].invalid:
        expect = surgery.NoMatchError
    return Step("apply", specs, with_inputs=draw(st.integers(0, 3)) > 0,
                expect=expect)


@st.composite
def steps(draw: st.DrawFn, case: ModelCase) -> Step:
    """One step of a pipeline."""
    op = draw(st.sampled_from(["apply"] * 6 + ["set_active", "combine", "delete", "save_load"]))
    names = st.sampled_from(ADAPTER_NAMES + ("missing",))
    if op == "apply":
        return draw(apply_steps(case))
    if op == "set_active":
        which = draw(st.one_of(st.none(), names, st.lists(names, max_size=2, unique=True)))
        return Step("set_active", args={"names": which})
    if op == "combine":
        sources = draw(st.one_of(st.just(PRESENT), st.lists(names, min_size=1, max_size=2,
                                                             unique=True)))
        weights = [draw(st.sampled_from([1.0, 0.5, -0.5, 2.0])) for _ in range(2)]
        if sources != PRESENT:
            weights = dict(zip(sources, weights))
        return Step("combine", args={"weights": weights,
                                     "method": draw(st.sampled_from(["linear", "cat", "svd"])),
                                     "name": draw(st.sampled_from(["mix", "a", "mix"]))})
    if op == "delete":
        return Step("delete", args={"name": draw(st.one_of(st.just(PRESENT), names))})
    return Step("save_load", args={"names": draw(st.one_of(st.none(), names))})


@st.composite
def lora_steps(draw: st.DrawFn, case: ModelCase) -> Step:
    """A valid step adding one or two LoRA adapters (named apart) on the same drawn linear
    layers, so that later operations (combine, delete, merge) meet real adapters."""
    layers = draw(st.lists(st.sampled_from(case.linears), min_size=1, max_size=3, unique=True))
    names = draw(st.lists(st.sampled_from(ADAPTER_NAMES), min_size=1, max_size=2, unique=True))
    rank = draw(st.sampled_from([1, 2, 4]))
    specs = tuple(_spec("LoRAPass", name=n, pattern=layers, rank=rank,
                        alpha=draw(st.sampled_from([1.0, 8.0])),
                        init=draw(st.sampled_from(["kaiming", "gaussian"])),
                        dropout=draw(st.sampled_from([0.0, 0.1]))) for n in names)
    return Step("apply", specs, with_inputs=draw(st.booleans()))


def pipelines(case: ModelCase, max_steps: int = 4) -> st.SearchStrategy[list[Step]]:
    """1 to ``max_steps`` steps for ``case``; the first applies passes (half of the time a
    valid :func:`lora_steps`)."""
    first = st.one_of(apply_steps(case), lora_steps(case))
    return st.tuples(first, st.lists(steps(case), max_size=max_steps - 1)).map(
        lambda t: [t[0], *t[1]])

"""Adapter names are free strings, as in PEFT (``surgery/adapters/names.py``).

Every pass kind is applied under names that are not Python identifiers ("test-adapter",
"my adapter", "über", "a+b") and taken through the adapter life cycle: forward, a training
step, merge and unmerge, switching, deletion, save and load, the audit and the diagram.
State-dict keys carry the name verbatim (``q_proj.lora_A.test-adapter.weight``).

Tolerance where outputs are not said to be equal: ``|a - b| <= 1e-5 · (1 + max|b|)``
(float32; merged weights round once). DoRA at init equals the layer up to rounding only
(``m / ‖W‖`` is one within an ulp), so its identity at init is checked to that tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery import (
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeIA3Pass,
    MergeLoRAPass,
    ParallelAdapterPass,
    PrefixPass,
    SerialAdapterPass,
    UnmergeIA3Pass,
    UnmergeLoRAPass,
    adapter_names,
    apply_passes,
    audit,
    delete_adapter,
    load_adapters,
    save_adapters,
    set_active,
    trainable_parameters,
)
from surgery.adapters.names import check_adapter_name, identifier_part
from surgery.sites.site_graph import site_graphs

NAMES = ["test-adapter", "my adapter", "über", "a+b"]


@dataclass(frozen=True)
class Kind:
    """One pass kind: the zoo model it adapts and the pass, given an adapter name."""

    model: str
    make: Callable[[str], Any]
    merge: tuple[type, type] | None  # (merge pass, unmerge pass), None: does not fold
    exact_init: bool = True  # outputs bitwise equal the base's at init


KINDS = {
    "lora": Kind("builtin:tiny", lambda n: LoRAPass(pattern=["q_proj", "v_proj"], rank=4,
                                                    name=n), (MergeLoRAPass, UnmergeLoRAPass)),
    "dora": Kind("builtin:tiny", lambda n: LoRAPass(pattern="q_proj", rank=4, use_dora=True,
                                                    name=n),
                 (MergeLoRAPass, UnmergeLoRAPass), exact_init=False),
    "lora_conv": Kind("builtin:convnet", lambda n: LoRAPass(pattern=["features.0", "features.4"],
                                                            rank=2, name=n),
                      (MergeLoRAPass, UnmergeLoRAPass)),
    "lora_embedding": Kind("builtin:tiny", lambda n: LoRAPass(pattern="embed", rank=4, name=n),
                           (MergeLoRAPass, UnmergeLoRAPass)),
    "ia3": Kind("builtin:tiny", lambda n: IA3Pass(pattern=["k_proj", "v_proj", "down_proj"],
                                                  feedforward=["down_proj"], name=n),
                (MergeIA3Pass, UnmergeIA3Pass)),
    "serial": Kind("builtin:tiny", lambda n: SerialAdapterPass(bottleneck=4, name=n), None),
    "parallel": Kind("builtin:tiny", lambda n: ParallelAdapterPass(bottleneck=4, name=n), None),
    "prefix": Kind("builtin:tiny", lambda n: PrefixPass(length=3, gate="zero", name=n), None),
    "prefix_hf": Kind("hf:llama", lambda n: PrefixPass(length=3, gate="zero", name=n), None),
}

CASES = [pytest.param(kind, name, id=f"{kind}-{name}") for kind in KINDS for name in NAMES]


def _adapt(zoo: Any, kind: str, name: str) -> tuple[Any, nn.Module]:
    spec = zoo.spec(KINDS[kind].model)
    model = apply_passes(spec.model, [KINDS[kind].make(name)],
                         example_inputs=spec.example_inputs, example_kwargs=spec.example_kwargs)
    return spec, model


def _out(model: nn.Module, spec: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    out = out if isinstance(out, torch.Tensor) else out.logits
    return out


def _randomize(model: nn.Module) -> None:
    """Every adapter parameter (the trainable ones) moved away from its initialisation by
    seeded noise ``N(0, 0.1²)``, so that every adapter changes the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainable_parameters(model):
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-5 * (1.0 + b.abs().max().item())
    assert (a - b).abs().max().item() <= tol


def _adapter_keys(model: nn.Module, base: nn.Module) -> list[str]:
    return sorted(set(model.state_dict()) - set(base.state_dict()))


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("name", NAMES + ["default", "x", " ", "a/b", "0", "lora_A"])
def test_free_names_are_accepted(name: str) -> None:
    assert check_adapter_name("LoRAPass", name) == name
    assert LoRAPass(name=name).adapter_name == name


@pytest.mark.parametrize("make, who", [
    (lambda n: LoRAPass(name=n), "LoRAPass"),
    (lambda n: IA3Pass(name=n), "IA3Pass"),
    (lambda n: SerialAdapterPass(name=n), "SerialAdapterPass"),
    (lambda n: ParallelAdapterPass(name=n), "ParallelAdapterPass"),
    (lambda n: PrefixPass(length=2, name=n), "PrefixPass"),
])
@pytest.mark.parametrize("bad, why", [
    ("a.b", r"'a\.b' contains '\.'.*Way out: name='a_b' \(name\.replace\('\.', '_'\)\)"),
    (".", r"'\.' contains '\.'.*Way out: name='default'"),
    ("", r"must be a non-empty str, got ''"),
    (3, r"must be a str .*got 3 of type int"),
    ("keys", r"'keys' is an attribute of nn\.ModuleDict"),
    ("None", r"'None' is a Python keyword.*Way out: name='None_'"),
    ("class", r"'class' is a Python keyword.*Way out: name='class_'"),
    ('say "hi"', r"""'say "hi"' holds '"', which torch\.fx cannot write.*name='say _hi_'"""),
    ("a\nb", r"'a\\nb' holds '\\n'.*Way out: name='a_b'"),
])
def test_refusals_name_the_pass(make, who: str, bad: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{who}: .*{why}"):
        make(bad)


def test_refusals_of_adapter_operations(zoo, tmp_path) -> None:
    from surgery import combine_adapters, export_peft, import_peft

    spec, model = _adapt(zoo, "lora", "test-adapter")
    for call, who in [(lambda: set_active(model, "a.b"), "set_active"),
                      (lambda: delete_adapter(model, "a.b"), "delete_adapter"),
                      (lambda: delete_adapter(model, ""), "delete_adapter"),
                      (lambda: save_adapters(model, tmp_path, names=["a.b"]), "save_adapters"),
                      (lambda: combine_adapters(model, {"test-adapter": 1.0}, name="a.b"),
                       "combine_adapters"),
                      (lambda: export_peft(model, tmp_path / "p", names=["a.b"]), "export_peft"),
                      (lambda: import_peft(spec.model, tmp_path, adapter_name=3), "import_peft")]:
        with pytest.raises(ConfigError, match=rf"^{who}: "):
            call()
    assert adapter_names(model) == {"test-adapter": ("lora",)}


def test_identifier_part() -> None:
    assert identifier_part("test-adapter") == "test_adapter"
    assert identifier_part("my adapter") == "my_adapter"
    assert identifier_part("über") == "_ber"
    assert identifier_part("9a") == "_9a"
    assert all(identifier_part(n).isidentifier() for n in NAMES)


# --------------------------------------------------------------------------- the life cycle


@pytest.mark.parametrize("kind, name", CASES)
def test_apply_forward_and_keys(zoo, kind: str, name: str) -> None:
    spec, model = _adapt(zoo, kind, name)
    assert adapter_names(model) == {name: (KINDS[kind].make(name).name,)}
    keys = _adapter_keys(model, spec.model)
    assert keys and all(f".{name}." in f".{k}." for k in keys), keys
    for _, sg in site_graphs(model):  # the generated code compiles, node names are identifiers
        assert all(node.name.isidentifier() for node in sg.graph.nodes)
    base = _out(spec.model, spec)
    if KINDS[kind].exact_init:
        assert torch.equal(_out(model, spec), base)
    else:
        _close(_out(model, spec), base)


@pytest.mark.parametrize("kind, name", CASES)
def test_train_step_reaches_the_adapter(zoo, kind: str, name: str) -> None:
    spec, model = _adapt(zoo, kind, name)
    _randomize(model)
    model.train()
    out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    out = out if isinstance(out, torch.Tensor) else out.logits
    out.square().mean().backward()
    params = list(trainable_parameters(model))
    named = dict(model.named_parameters())
    assert params and all(f".{name}." in f".{k}." for k, p in named.items() if p.requires_grad)
    assert all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in named.values() if not p.requires_grad)


@pytest.mark.parametrize("kind, name", [c for c in CASES if KINDS[c.values[0]].merge])
def test_merge_unmerge_is_bitwise(zoo, kind: str, name: str) -> None:
    spec, model = _adapt(zoo, kind, name)
    _randomize(model)
    before = _out(model, spec)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merge, unmerge = KINDS[kind].merge
    merged = apply_passes(model, [merge(names=[name])])
    _close(_out(merged, spec), before)
    back = apply_passes(merged, [unmerge(names=[name])])
    assert torch.equal(_out(back, spec), before)
    state = back.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


@pytest.mark.parametrize("kind, name", CASES)
def test_switch_delete_save_load(zoo, kind: str, name: str, tmp_path: Path) -> None:
    spec, model = _adapt(zoo, kind, name)
    _randomize(model)
    adapted, base = _out(model, spec), _out(spec.model, spec)
    assert not torch.equal(adapted, base)
    assert torch.equal(_out(set_active(model, []), spec), base)
    assert torch.equal(_out(set_active(model, name), spec), adapted)

    save_adapters(model, tmp_path, names=[name])
    loaded = load_adapters(spec.model, tmp_path, names=name)
    assert adapter_names(loaded) == adapter_names(model)
    assert torch.equal(_out(loaded, spec), adapted)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    gone = delete_adapter(model, name)
    assert adapter_names(gone) == {}
    assert gone.state_dict().keys() == spec.model.state_dict().keys()
    assert torch.equal(_out(gone, spec), base)


@pytest.mark.parametrize("kind, name", CASES)
def test_audit_and_diagram_show_the_name(zoo, kind: str, name: str) -> None:
    from visualize import to_dot, to_networkx

    _, model = _adapt(zoo, kind, name)
    assert name in str(audit(model))
    dot = to_dot(to_networkx(model))
    assert name in dot


# --------------------------------------------------------------------------- several adapters


def _two(zoo: Any) -> tuple[Any, nn.Module]:
    spec = zoo.spec("builtin:tiny")
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=4, name="test-adapter"),
                                      LoRAPass(pattern="q_proj", rank=2, name="my adapter")])
    _randomize(model)
    return spec, model


def test_combine_under_a_free_name(zoo) -> None:
    from surgery import combine_adapters

    spec, model = _two(zoo)
    alone = _out(set_active(model, "test-adapter"), spec)
    mixed = combine_adapters(model, {"test-adapter": 1.0}, name="a+b")
    assert list(adapter_names(mixed)) == ["test-adapter", "my adapter", "a+b"]
    assert "layers.0.attn.q_proj.lora_A.a+b.weight" in mixed.state_dict()
    _close(_out(set_active(mixed, "a+b"), spec), alone)


def test_stack_routes_samples_to_free_names(zoo) -> None:
    from surgery import AdapterStack

    spec, model = _two(zoo)
    ids = spec.example_inputs[0]
    rows = [_out(set_active(model, n), spec) for n in ("test-adapter", "my adapter")]
    stack = AdapterStack(model, names=["test-adapter", "my adapter"]).eval()
    with torch.no_grad():
        routed = stack(ids, adapter_id=torch.tensor([0, 1]))
        by_name = stack(ids, adapter_id="my adapter")
    assert torch.equal(routed[0], rows[0][0]) and torch.equal(routed[1], rows[1][1])
    assert torch.equal(by_name, rows[1])


def test_report_escapes_the_name(zoo, tmp_path: Path) -> None:
    import html

    from surgery import render_diff

    spec = zoo.spec("builtin:tiny")
    name = "x<y>&z 'q'"
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=4, name=name)])
    render_diff(spec.model, model, tmp_path)
    page = (tmp_path / "diff.html").read_text(encoding="utf-8")
    assert html.escape(name, quote=True) in page and name not in page
    assert name in (tmp_path / "after.dot").read_text(encoding="utf-8")

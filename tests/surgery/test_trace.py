"""Tests of surgery/trace.py: both front ends, their errors, and the pitfalls users report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from helpers import MaskedMLP
from surgery import IA3Pass, LoRAPass, TraceError, apply_passes, list_targets, trace
from surgery.errors import InputMismatchError
from surgery.map.graphs import call_sites, graph_modules
from surgery.map.trace import is_traced

# ---- small models ----------------------------------------------------------------------


class Gate(nn.Module):
    """Branches on the data: neither fx nor export (without a guard) can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the line the error must point at
            return self.fc(x)
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.pre(x))


class DropNet(nn.Module):
    """Dropout between two layers; fx can trace it, export is forced in one test."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(y + x)


# ---- front ends ----------------------------------------------------------------------------


def test_fx_front_end_for_plain_code(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    traced = trace(spec.model)
    assert isinstance(traced, fx.GraphModule)
    assert traced._surgery.frontend == "fx" and traced._surgery.source_class is type(spec.model)
    assert is_traced(traced) and not is_traced(spec.model)
    assert torch.equal(traced(*spec.example_inputs), spec.model(*spec.example_inputs))
    lin = traced.get_submodule("layers.0.attn.q_proj")
    assert type(lin) is nn.Linear
    assert lin.weight is not spec.model.layers[0].attn.q_proj.weight
    assert lin.weight.data_ptr() == spec.model.layers[0].attn.q_proj.weight.data_ptr()


def test_export_front_end_when_fx_fails(zoo) -> None:
    traced = zoo.traced("hf:gpt2")
    assert traced._surgery.frontend == "export"
    assert type(traced).__name__ == "UnflattenedModule"
    sites = call_sites(traced)
    assert type(traced.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"
    assert len(sites["transformer.h.1.mlp.c_fc"]) == 1


def test_forced_front_ends_and_bad_choice(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    exported = trace(spec.model, spec.example_inputs, frontend="export")
    assert exported._surgery.frontend == "export"
    assert torch.equal(exported(*spec.example_inputs), spec.model(*spec.example_inputs))
    with pytest.raises(ValueError, match="frontend must be 'auto', 'fx' or 'export', got 'jit'"):
        trace(spec.model, frontend="jit")


def test_trace_leaves_caller_alone(snapshot) -> None:
    model = DropNet().train()
    before = snapshot(model)
    trace(model, (torch.randn(2, 3, 8),), frontend="export")
    trace(model)
    before.assert_unchanged(model)


# ---- TraceError ------------------------------------------------------------------------------


def test_trace_error_without_inputs_names_module_line_and_way_out() -> None:
    with pytest.raises(TraceError) as info:
        trace(Gated())
    msg = str(info.value)
    assert msg.startswith("could not trace Gated.")
    assert "in module gate (Gate)" in msg
    assert f"{__file__}:" in msg and "if x.sum() > 0:" in msg
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1)
                if "the line the error must point at" in text)
    assert f"{__file__}:{line} in forward" in msg
    assert "torch.export: not tried, because no example_inputs were given" in msg
    assert "example_inputs=(...)" in msg and "leaf_modules=[...]" in msg
    assert isinstance(info.value, RuntimeError)


def test_trace_error_with_inputs_reports_both_front_ends() -> None:
    with pytest.raises(TraceError) as info:
        trace(Gated(), (torch.randn(2, 4),))
    msg = str(info.value)
    fx_part, export_part = msg.split("  torch.export: ")
    assert "torch.fx: TraceError" in fx_part and "in module gate (Gate)" in fx_part
    assert "if x.sum() > 0:" in export_part and "in module gate (Gate)" in export_part
    assert "leaf_modules=[...]" in export_part
    assert isinstance(info.value.__cause__, Exception)


def test_leaf_module_is_the_way_out() -> None:
    model = Gated()
    traced = trace(model, leaf_modules=["gate"])
    x = torch.randn(3, 4)
    assert torch.equal(traced(x), model(x))
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["pre", "gate"]


# ---- pitfalls users report ------------------------------------------------------------------


def test_optional_mask_traces_the_default_path() -> None:
    model = MaskedMLP()
    traced = trace(model)
    x = torch.randn(2, 5, 8)
    assert torch.equal(traced(x), model(x))
    assert torch.equal(traced(x, attention_mask=None), model(x))  # the keyword keeps its name
    mask = next(n for n in traced.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    assert [u.target.__name__ for u in mask.users] == ["_assert_fixed_input"], "only the default path"
    with pytest.raises(InputMismatchError, match="attention_mask fixed to None"):
        traced(x, attention_mask=torch.ones(2, 5))
    adapted = apply_passes(model, [LoRAPass(pattern="up"), IA3Pass(pattern="down", feedforward="down")])
    assert torch.equal(adapted(x), model(x))


def test_optional_mask_given_as_example_kwarg_is_traced_as_input() -> None:
    model = MaskedMLP()
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    traced = trace(model, example_kwargs={"attention_mask": mask})
    x = torch.randn(2, 5, 8)
    assert torch.equal(traced(x, attention_mask=mask), model(x, attention_mask=mask))


def test_mask_handed_to_a_wrapped_function_stays_an_input(zoo) -> None:
    """TinyTransformer builds its mask in a ``torch.fx.wrap`` function that takes None."""
    spec = zoo.spec("builtin:tiny")
    traced = trace(spec.model)
    ids = spec.example_inputs[0]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    assert torch.equal(traced(ids, attention_mask=mask), spec.model(ids, attention_mask=mask))
    assert torch.equal(traced(ids), spec.model(ids))
    assert torch.equal(traced(ids[:1, :7]), spec.model(ids[:1, :7]))


def test_train_mode_is_kept_and_eval_toggles_dropout_on_fx() -> None:
    torch.manual_seed(0)
    model = DropNet().train()
    adapted = apply_passes(model, [LoRAPass(pattern="fc*")])
    assert adapted.training and model.training
    assert all(m.training for m in adapted.modules())
    x = torch.randn(4, 8)
    assert not torch.equal(adapted(x), adapted(x)), "dropout is active in train mode"
    adapted.eval()
    assert model.training, "eval() on the adapted model leaves the caller alone"
    assert torch.equal(adapted(x), model.eval()(x))


def test_eval_and_train_toggle_dropout_modules_on_export() -> None:
    torch.manual_seed(0)
    model = DropNet().train()
    exported = trace(model, (torch.randn(2, 3, 8),), frontend="export")
    adapted = apply_passes(exported, [LoRAPass(pattern="fc*")])
    assert adapted._surgery.frontend == "export" and adapted.training
    assert type(adapted.get_submodule("drop")) is nn.Dropout
    x = torch.randn(5, 3, 8)
    assert not torch.equal(adapted(x), adapted(x)), "nn.Dropout is a real module in train mode"
    adapted.eval()
    assert not adapted.get_submodule("drop").training
    assert torch.equal(adapted(x), adapted(x))
    assert torch.equal(adapted(x), model.eval()(x))
    adapted.train()
    assert not torch.equal(adapted(x), adapted(x))


# ---- export: dynamic batch and sequence ---------------------------------------------------


@pytest.mark.parametrize("name", ["builtin:encoder", "hf:gpt2", "hf:llama", "hf:bert"])
def test_export_accepts_other_batch_and_sequence_sizes(zoo, run_model, no_mha_fastpath, name: str) -> None:
    spec = zoo.spec(name)
    adapted = apply_passes(zoo.traced(name), [IA3Pass()])
    if name == "builtin:encoder":
        args = (torch.randn(3, 9, 64),)
        reference = copy.deepcopy(spec.model).requires_grad_(False)  # see test_invariants
    else:
        args = (torch.randint(0, 128, (3, 9)),)
        reference = spec.model
    kwargs = {}
    if spec.example_kwargs:
        kwargs = {"attention_mask": torch.ones(3, 9, dtype=torch.long)}
        kwargs["attention_mask"][0, 6:] = 0
    with torch.no_grad():
        got = run_model(adapted, spec, args=args, kwargs=kwargs)
        want = run_model(reference, spec, args=args, kwargs=kwargs)
    assert got.shape[:2] == (3, 9)
    assert torch.equal(got, want)


def test_export_model_called_without_a_traced_keyword_says_so(zoo, capsys) -> None:
    traced = zoo.traced("hf:llama")
    ids = zoo.spec("hf:llama").example_inputs[0]
    with pytest.raises(TypeError, match=r"traced through torch.export\) was traced with "
                                        r"attention_mask as an input.*Way out: pass attention_mask="):
        traced(ids)
    assert capsys.readouterr().out == "", "nothing printed on the way"


# ---- nn.MultiheadAttention ------------------------------------------------------------------


def test_mha_is_one_real_module_call_on_fx() -> None:
    model = MHANet().eval()
    traced = trace(model)
    assert traced._surgery.frontend == "fx"
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["attn", "fc"]
    assert type(traced.get_submodule("attn")) is nn.MultiheadAttention
    targets = {t.qname: t for t in list_targets(traced)}
    assert targets["attn"].role == "attention" and targets["attn"].shape == (48, 16)


def test_mha_is_one_real_module_call_on_export(zoo, run_model, no_mha_fastpath) -> None:
    traced = zoo.traced("builtin:encoder")
    spec = zoo.spec("builtin:encoder")
    for i in range(2):
        mha = traced.get_submodule(f"layers.{i}.self_attn")
        assert type(mha) is nn.MultiheadAttention
        eager = spec.model.layers[i].self_attn
        assert mha is not eager and mha.in_proj_weight.data_ptr() == eager.in_proj_weight.data_ptr()
    owners = [p for p, _ in graph_modules(traced)]
    assert "layers.0.self_attn" not in owners
    targets = {t.qname: t for t in list_targets(traced)}
    assert targets["layers.0.self_attn"].role == "attention"
    assert targets["layers.1.linear2"].role == "ffn_down"
    assert torch.equal(run_model(traced, spec), run_model(spec.model, spec))
    x = torch.randn(1, 5, 64)
    assert torch.equal(traced(x), spec.model(x))

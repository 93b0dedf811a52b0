"""Tests of surgery/map/trace.py: the map (both front ends, weight-free), its errors, and
the tracing pitfalls users report, seen from the adapted model the user gets back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import MaskedMLP
from torch import fx, nn

from surgery import IA3Pass, LoRAPass, TraceError, apply_passes, list_targets, trace
from surgery.errors import ConfigError, InputTypeError
from surgery.map.graphs import call_sites, graph_modules
from surgery.map.trace import is_map

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


class ShapeBranch(nn.Module):
    """Branches on a size: fx cannot trace it, export (static shapes) can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 4:
            return self.fc(x)
        return x


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


def test_fx_map_is_weight_free_and_names_the_users_modules(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    graph_map = trace(spec.model, spec.example_inputs)
    assert isinstance(graph_map, fx.GraphModule)
    info = graph_map._surgery_map
    assert info.frontend == "fx" and info.source_class is type(spec.model) and info.weight_free
    assert is_map(graph_map) and not is_map(spec.model)
    lin = graph_map.get_submodule("layers.0.attn.q_proj")
    assert type(lin) is nn.Linear and lin.weight.device.type == "meta"
    assert lin.weight.shape == spec.model.layers[0].attn.q_proj.weight.shape
    assert all(p.device.type == "meta" for p in graph_map.parameters())
    shapes = {n.name: tuple(n.meta["val"].shape) for n in graph_map.graph.nodes if "val" in n.meta}
    assert shapes["layers_0_attn_q_proj"] == (2, 16, 64), "shapes recorded from the example inputs"


def test_export_map_when_fx_fails(zoo) -> None:
    graph_map = zoo.traced("hf:gpt2")
    assert graph_map._surgery_map.frontend == "export" and graph_map._surgery_map.weight_free
    assert type(graph_map).__name__ == "UnflattenedModule"
    assert type(graph_map.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"
    assert len(call_sites(graph_map)["transformer.h.1.mlp.c_fc"]) == 1
    assert graph_map._surgery_map.notes and "use_cache" in graph_map._surgery_map.notes[0]


def test_forced_front_ends_and_bad_choice(zoo) -> None:
    spec = zoo.spec("builtin:tiny")
    exported = trace(spec.model, spec.example_inputs, frontend="export")
    assert exported._surgery_map.frontend == "export"
    assert "layers.0.attn.q_proj" in call_sites(exported)
    with pytest.raises(ValueError, match="frontend must be 'auto', 'fx' or 'export', got 'jit'"):
        trace(spec.model, frontend="jit")


def test_trace_leaves_caller_alone(snapshot, zoo) -> None:
    model = DropNet().train()
    before = snapshot(model)
    trace(model, (torch.randn(2, 3, 8),), frontend="export")
    trace(model)
    before.assert_unchanged(model)
    llama = zoo.fresh("hf:llama")
    before = snapshot(llama.model)
    trace(llama.model, llama.example_inputs, llama.example_kwargs)
    before.assert_unchanged(llama.model)
    assert llama.model.config.use_cache is True, "the cache is switched off on the map's copy only"


def test_a_map_is_not_a_model() -> None:
    graph_map = trace(DropNet())
    with pytest.raises(Exception, match="this is a map from surgery.trace.*pass the model itself"):
        apply_passes(graph_map, [LoRAPass(pattern="fc1")])


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


def test_keyword_inputs_alone_reach_export_when_fx_fails() -> None:
    graph_map = trace(ShapeBranch(), example_kwargs={"x": torch.randn(2, 4)})
    assert graph_map._surgery_map.frontend == "export"
    assert graph_map._surgery_map.example_inputs is None
    assert list(graph_map._surgery_map.example_kwargs) == ["x"]
    assert len(call_sites(graph_map)["fc"]) == 1


def test_a_dict_as_example_inputs_points_at_example_kwargs() -> None:
    with pytest.raises(InputTypeError, match=r"trace: example_inputs= is a dict \(keys 'x'\).*"
                       r"pass the dict as example_kwargs=\{\.\.\.\}") as info:
        trace(ShapeBranch(), {"x": torch.randn(2, 4)})
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TypeError)


def test_leaf_module_is_the_way_out() -> None:
    graph_map = trace(Gated(), leaf_modules=["gate"])
    assert [n.target for n in graph_map.graph.nodes if n.op == "call_module"] == ["pre", "gate"]


def test_pattern_selection_needs_no_map_where_roles_would() -> None:
    """Data-dependent code stops tracing, not adaptation by name."""
    model = Gated()
    adapted = apply_passes(model, [LoRAPass(pattern="fc", rank=2)])
    x = torch.randn(3, 4).abs()
    assert torch.equal(adapted(x), model(x)) and torch.equal(adapted(-x), model(-x))
    assert adapted._surgery.cached_map is None, "selection by name traced nothing"
    with pytest.raises(TraceError, match="LoRAPass: selecting by structural role .*pattern="):
        apply_passes(model, [LoRAPass()])


# ---- pitfalls users report, seen from the adapted model ------------------------------------


def test_optional_mask_stays_optional_on_the_adapted_model() -> None:
    model = MaskedMLP()
    adapted = apply_passes(model, [LoRAPass(pattern="up"), IA3Pass(pattern="down", feedforward="down")])
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(adapted(x), model(x))
    assert torch.equal(adapted(x, attention_mask=mask), model(x, attention_mask=mask))
    assert torch.equal(adapted(x, mask, 0.5), model(x, mask, 0.5)), "any input the model takes"


def test_the_map_traces_the_default_path_of_an_optional_mask() -> None:
    graph_map = trace(MaskedMLP())
    mask = next(n for n in graph_map.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    assert not any(n.name.startswith("getitem") for n in graph_map.graph.nodes), \
        "fixed to its default (None): the masked branch is not in the map"
    given = trace(MaskedMLP(), example_kwargs={"attention_mask": torch.ones(2, 5)})
    mask = next(n for n in given.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    assert any(u.name.startswith("getitem") for u in mask.users), \
        "given as an example input: the masked branch is traced"


def test_train_mode_is_kept_and_eval_toggles_dropout() -> None:
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
    adapted.train()
    assert not torch.equal(adapted(x), adapted(x))


def test_functional_dropout_in_a_site_follows_train_and_eval() -> None:
    """A value the module's own forward picks by self.training is read at run time in its
    site graph; a forward that picks what to compute by mode is refused."""
    from surgery import UnsupportedSiteError
    from surgery.sites.site_graph import site_graph_at

    class FunctionalDrop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.dropout(self.fc(x), 0.5, self.training)
            return F.scaled_dot_product_attention(y[None], y[None], y[None],
                                                  dropout_p=0.5 if self.training else 0.0)[0]

    class Branchy(FunctionalDrop):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * 2 if self.training else self.fc(x)

    torch.manual_seed(0)
    model = nn.Sequential(FunctionalDrop(), Branchy()).train()
    _, sg = site_graph_at(model, "0", who="test")
    x = torch.randn(4, 8)
    assert not torch.equal(model(x), model(x)), "dropout acts in train mode"
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.equal(sg(x), FunctionalDrop.forward(sg, x))
    with pytest.raises(UnsupportedSiteError, match=r"1 \(Branchy\) computes something different "
                                                   r"in train\(\) and eval\(\)"):
        site_graph_at(model, "1", who="test")


@pytest.mark.parametrize("name", ["builtin:encoder", "hf:gpt2", "hf:llama", "hf:bert"])
def test_adapted_models_take_other_batch_and_sequence_sizes(zoo, run_model, no_mha_fastpath,
                                                            name: str) -> None:
    spec = zoo.spec(name)
    adapted = apply_passes(spec.model, [IA3Pass()], spec.example_inputs, spec.example_kwargs)
    args = (torch.randn(3, 9, 64),) if name == "builtin:encoder" else \
        (torch.randint(0, 128, (3, 9)),)
    kwargs = {}
    if spec.example_kwargs:
        kwargs = {"attention_mask": torch.ones(3, 9, dtype=torch.long)}
        kwargs["attention_mask"][0, 6:] = 0
    # nn.MultiheadAttention picks its matmul kernel from the weights' requires_grad flags:
    # compare with the same flags (see test_invariants._reference)
    reference = copy.deepcopy(spec.model).requires_grad_(False) if name == "builtin:encoder" \
        else spec.model
    with torch.no_grad():
        got = run_model(adapted, spec, args=args, kwargs=kwargs)
        want = run_model(reference, spec, args=args, kwargs=kwargs)
        one = run_model(adapted, spec, args=tuple(a[:1] for a in args),
                        kwargs={k: v[:1] for k, v in kwargs.items()})
    assert got.shape[:2] == (3, 9)
    assert torch.equal(got, want)
    assert one.shape[0] == 1, "a batch of one works too"


# ---- nn.MultiheadAttention ------------------------------------------------------------------


def test_mha_is_one_module_call_in_the_fx_map() -> None:
    model = MHANet().eval()
    graph_map = trace(model)
    assert graph_map._surgery_map.frontend == "fx"
    calls = [n for n in graph_map.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["attn", "fc"]
    assert type(graph_map.get_submodule("attn")) is nn.MultiheadAttention
    targets = {t.qname: t for t in list_targets(model)}
    assert targets["attn"].role == "attention" and targets["attn"].shape == (48, 16)


def test_mha_is_one_module_call_in_the_export_map(zoo) -> None:
    graph_map = zoo.traced("builtin:encoder")
    for i in range(2):
        assert type(graph_map.get_submodule(f"layers.{i}.self_attn")) is nn.MultiheadAttention
    owners = [p for p, _ in graph_modules(graph_map)]
    assert "layers.0.self_attn" not in owners
    model = zoo.spec("builtin:encoder")
    targets = {t.qname: t for t in list_targets(model.model, model.example_inputs)}
    assert targets["layers.0.self_attn"].role == "attention"
    assert targets["layers.1.linear2"].role == "ffn_down"

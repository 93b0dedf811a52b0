"""Tests of passes/adapters.py, passes/bottleneck_rewrite.py and passes/bottleneck.py: serial
(Houlsby / Pfeiffer) bottleneck adapters, and what serial and parallel adapters share.

The invariant table on the zoo (TinyTransformer, GPT-2, LLaMA, BERT, each adapted once with
serial and parallel adapters, see ``adapter_cases.adapted_zoo``), copies, a transformers
causal LM (``labels=`` loss, ``generate``), models that are one layer, the serial residual
in pre-LN and post-LN blocks, placements and selection, stacking with LoRA / IA³, the
``active`` switch, errors and the audit.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import (
    MLP,
    PROJ,
    ROWS,
    PreLNBlock,
    Row,
    adapted_zoo,
    adapter_params,
    branch,
    capture,
    lora_update,
    set_random,
)
from helpers import Shared
from torch import nn

from passes.adapters import ParallelAdapterPass, SerialAdapterPass
from passes.bottleneck import BottleneckAdapter
from surgery import (
    AlreadyAdaptedError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    SiteGraph,
    apply_passes,
    audit,
    named_trainable_parameters,
    plan,
)

# ---- the invariant table --------------------------------------------------------------------


@pytest.mark.parametrize("model", list(ROWS))
def test_invariants(zoo, snapshot, run_model, model: str) -> None:
    row, spec = ROWS[model], zoo.spec(model)
    shared = adapted_zoo(zoo, model, snapshot)
    assert type(shared) is type(spec.model), "the adapted model is the user's class"
    serial = sorted(n for fmt in row.serial for n in Row.names(fmt))
    parallel = Row.names(row.ffn) + (Row.names(row.attn) if row.attn else [])

    # identity at init, bitwise
    expected = run_model(spec.model, spec)
    with torch.no_grad():
        got = run_model(shared, spec)
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item():.3g}"

    # exactly the adapter parameters train; every base parameter is frozen and shares storage
    assert {n for n, _ in named_trainable_parameters(shared)} == \
        adapter_params(serial, "adapter") | adapter_params(parallel, "parallel_adapter")
    base = dict(spec.model.named_parameters())
    frozen = {n: p for n, p in shared.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == sorted(base)
    assert all(frozen[n] is not p and frozen[n].data_ptr() == p.data_ptr() for n, p in base.items())

    # what each adapter reads (at init every activation is the base model's): a serial
    # adapter the anchor's output, a parallel adapter the input of the sub-layer's first layer
    reads = {f"{s}.adapter.default.down": (s, 1) for s in serial}
    pairs = [(row.ffn, row.ffn_in)] + ([(row.attn, row.attn_in)] if row.attn else [])
    for site, first in pairs:
        for i in range(2):
            reads[f"{site.format(i=i)}.parallel_adapter.default.down"] = (first.format(i=i), 0)
    with torch.no_grad(), capture(shared, *reads) as seen, \
            capture(spec.model, *{b for b, _ in reads.values()}) as base_seen:
        run_model(shared, spec)
        run_model(spec.model, spec)
    for down, (layer, which) in reads.items():
        assert torch.equal(seen[down][0], base_seen[layer][which]), down

    # gradients: up gets them at init (down's are exactly zero while up is zero) ...
    adapted = copy.deepcopy(shared)
    adapted.train()
    run_model(adapted, spec).float().pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        if ".up." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name
    # ... and every adapter parameter gets them once up is non-zero
    adapted.zero_grad(set_to_none=True)
    set_random(adapted, 0)
    run_model(adapted, spec).float().pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)


@pytest.mark.parametrize("model", ["builtin:tiny", "hf:llama"])
def test_copies_and_pickles_keep_outputs(zoo, snapshot, run_model, model: str) -> None:
    spec = zoo.spec(model)
    adapted = copy.deepcopy(adapted_zoo(zoo, model, snapshot)).eval()
    set_random(adapted, 1, which=PROJ)
    with torch.no_grad():
        want = run_model(adapted, spec)
        assert not torch.equal(want, run_model(spec.model, spec))
        for other in (copy.deepcopy(adapted), pickle.loads(pickle.dumps(adapted))):
            assert type(other) is type(spec.model)
            assert torch.equal(run_model(other, spec), want)
            assert audit(other).adapters == audit(adapted).adapters


def test_state_dict_keys_read_naturally(zoo, snapshot) -> None:
    keys = adapted_zoo(zoo, "builtin:tiny", snapshot).state_dict()
    assert keys["layers.0.attn.o_proj.adapter.default.down.weight"].shape == (8, 64)
    assert keys["layers.0.attn.o_proj.adapter.default.down.bias"].shape == (8,)
    assert keys["layers.0.attn.o_proj.adapter.default.up.weight"].shape == (64, 8)
    assert not keys["layers.0.attn.o_proj.adapter.default.up.weight"].any()
    assert not keys["layers.0.attn.o_proj.adapter.default.up.bias"].any()
    assert keys["layers.0.mlp.parallel_adapter.default.down.weight"].shape == (8, 64)
    assert "layers.0.mlp.down_proj.weight" in keys and "layers.0.attn.o_proj.weight" in keys


# ---- transformers models and one-layer models -----------------------------------------------


def test_causal_lm_trains_with_labels_and_generates(zoo, snapshot) -> None:
    adapted = copy.deepcopy(adapted_zoo(zoo, "hf:llama", snapshot))
    set_random(adapted, 2, which=PROJ)
    ids = zoo.spec("hf:llama").example_inputs[0]
    adapted.train()
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for _, p in named_trainable_parameters(adapted))
    adapted.eval()
    cached = adapted.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    uncached = adapted.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_a_linear_layer_is_a_model_too(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    adapter_pass = (SerialAdapterPass(pattern="*", bottleneck=4) if kind == "serial"
                    else ParallelAdapterPass(pattern="*", bottleneck=4, scaling=2.0))
    adapted = apply_passes(layer, [adapter_pass])
    assert isinstance(adapted, SiteGraph) and adapted.site == ""
    slot = "adapter" if kind == "serial" else "parallel_adapter"
    assert {n for n, _ in named_trainable_parameters(adapted)} == adapter_params([""], slot)
    assert layer.weight.requires_grad and not adapted.weight.requires_grad
    assert adapted.weight.data_ptr() == layer.weight.data_ptr()
    x = torch.randn(3, 16)
    assert torch.equal(adapted(x), layer(x))
    set_random(adapted, 4, which=PROJ)
    adapter = adapted.get_submodule(f"{slot}.default")
    with torch.no_grad():
        y = layer(x)
        want = y + (branch(adapter, y, F.gelu) if kind == "serial"
                    else 2.0 * branch(adapter, x, torch.relu))
        assert torch.equal(adapted(x), want)


# ---- serial adapters in pre-LN and post-LN blocks -------------------------------------------


class PostLNBlock(nn.Module):
    """BERT-style feed-forward sub-layer: ``norm(x + dropout(dense(gelu(fc(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.dense = nn.Linear(16, 8)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(8)

    def sublayer(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense(F.gelu(self.fc(x)))))


@pytest.mark.parametrize("block_cls,norm", [(PostLNBlock, "norm"), (PreLNBlock, "final")])
def test_serial_adapter_in_a_block_adds_its_residual_once(block_cls: type, norm: str) -> None:
    torch.manual_seed(0)
    block = block_cls().eval()
    x = torch.randn(3, 5, 8)
    adapted = apply_passes(block, [SerialAdapterPass(placement="pfeiffer", bottleneck=3)]).eval()
    adapter = adapted.get_submodule("dense.adapter.default")
    assert adapter.site == "dense" and adapter.role == "ffn_down"
    assert torch.equal(adapted(x), block(x)), "identity at init"
    set_random(adapted, 7)
    with torch.no_grad(), capture(adapted, norm) as seen:
        out = adapted(x)
        h = block.sublayer(x)                                    # the anchor's output
        want_pre = x + (h + branch(adapter, h, F.gelu))         # model residual + (h + f(h))
        assert torch.equal(seen[norm][0], want_pre)
        assert torch.equal(out, block.get_submodule(norm)(want_pre))


@pytest.mark.parametrize("model,anchor,residual,norm,residual_first", [
    ("hf:llama", "model.layers.0.self_attn.o_proj", "model.layers.0.input_layernorm",
     "model.layers.0.post_attention_layernorm", True),
    ("hf:bert", "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.query",
     "encoder.layer.0.attention.output.LayerNorm", False),
])
def test_serial_adapter_residual_counted_once_on_real_blocks(
        zoo, run_model, model: str, anchor: str, residual: str, norm: str,
        residual_first: bool) -> None:
    """LLaMA (pre-LN): ``residual + (h + f(h))`` reaches the next norm; BERT (post-LN):
    ``(h + f(h)) + residual`` reaches the LayerNorm. Selected by name: no map."""
    spec = zoo.spec(model)
    adapted = apply_passes(spec.model, [SerialAdapterPass(pattern=anchor, bottleneck=4)])
    assert adapted._surgery.cached_map is None
    set_random(adapted, 8)
    down, up = f"{anchor}.adapter.default.down", f"{anchor}.adapter.default.up"
    with torch.no_grad(), capture(adapted, residual, down, up, norm) as seen:
        run_model(adapted, spec)
    res, h, u, pre = seen[residual][0], seen[down][0], seen[up][1], seen[norm][0]
    assert u.abs().sum() > 0
    assert torch.equal(pre, res + (h + u) if residual_first else (h + u) + res)


# ---- selection ------------------------------------------------------------------------------


def test_houlsby_and_pfeiffer_placements(zoo, snapshot) -> None:
    llama = adapted_zoo(zoo, "hf:llama", snapshot)  # its map is cached: no new trace
    houlsby = SerialAdapterPass(reduction_factor=16).sites(llama)
    pfeiffer = SerialAdapterPass(placement="pfeiffer").sites(llama)
    assert [s.qname for s in houlsby] == [f"model.layers.{i}.{p}" for i in range(2)
                                          for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert [s.qname for s in pfeiffer] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    tiny = zoo.spec("builtin:tiny").model
    changes = plan(tiny, [SerialAdapterPass(placement="pfeiffer")])[0].changes
    assert {c.site for c in changes} == {f"layers.{i}.mlp.down_proj" for i in range(2)}
    shapes = {c.shape for c in changes if c.kind == "param_added" and c.name.endswith("down.weight")}
    assert shapes == {(4, 64)}, "reduction_factor 16 (the default) on width 64"


def test_pattern_and_role_replace_the_placement(zoo) -> None:
    model = zoo.spec("builtin:tiny").model
    assert [s.qname for s in SerialAdapterPass(role="attn_out").sites(model)] == \
        [f"layers.{i}.attn.o_proj" for i in range(2)]
    by_pattern = SerialAdapterPass(pattern="layers.1.mlp.*", placement="pfeiffer").sites(model)
    assert [s.qname for s in by_pattern] == ["layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    both = SerialAdapterPass(pattern=["mlp", "o_proj"]).sites(model)
    assert [s.qname for s in both] == [f"layers.{i}.{n}" for i in range(2)
                                       for n in ("attn.o_proj", "mlp")]
    assert [s.qname for s in SerialAdapterPass(pattern="*").sites(model)] == \
        [n for n, m in model.named_modules() if isinstance(m, nn.Linear)], "'*' keeps to layers"
    subs = ParallelAdapterPass(role="ffn", pattern="layers.0.**").sublayers(model)
    assert [s.module for s in subs] == ["layers.0.mlp"]
    subs = ParallelAdapterPass(role=["attn", "ffn"], exclude="layers.0.**").sublayers(model)
    assert [(s.kind, s.module) for s in subs] == [("attention", "layers.1.attn"), ("ffn", "layers.1.mlp")]


# ---- stacking and switching -----------------------------------------------------------------


@pytest.mark.parametrize("order", ["lora_first", "adapter_first"])
def test_serial_adapter_wraps_the_layer_as_adapted_by_lora(order: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    lora = LoRAPass(pattern="down", rank=2, alpha=4)
    serial = SerialAdapterPass(pattern="down", bottleneck=3)
    adapted = apply_passes(model, [lora, serial] if order == "lora_first" else [serial, lora])
    set_random(adapted, 12)
    with torch.no_grad():
        adapted.get_submodule("down.lora_B.default").weight.normal_()
    adapter = adapted.get_submodule("down.adapter.default")
    x = torch.randn(4, 6)
    with torch.no_grad():
        g = torch.relu(model.up(x))
        h = model.down(g) + lora_update(adapted, "down", g)
        assert torch.equal(adapted(x), x + (h + branch(adapter, h, F.gelu)))


def test_serial_adapter_on_a_shared_layer_follows_every_call() -> None:
    torch.manual_seed(0)
    model = Shared()
    adapted = apply_passes(model, [SerialAdapterPass(pattern="proj", bottleneck=2)])
    set_random(adapted, 14)
    adapter = adapted.get_submodule("proj.adapter.default")
    x = torch.randn(4, 8)
    with torch.no_grad():
        def f(h: torch.Tensor) -> torch.Tensor:
            return h + branch(adapter, h, F.gelu)

        assert torch.equal(adapted(x), model.head(f(model.proj(torch.relu(f(model.proj(x)))))))


def test_ia3_after_a_serial_adapter_scales_the_adapted_output() -> None:
    torch.manual_seed(0)
    model = MLP()
    adapted = apply_passes(model, [SerialAdapterPass(pattern="up", bottleneck=3),
                                   IA3Pass(pattern="up")])
    set_random(adapted, 15)
    vec = adapted.get_submodule("up.ia3.default")
    scales = adapted.get_parameter("up.ia3_l.default")  # (out, 1)
    assert vec.mode == "output"
    with torch.no_grad():
        scales.uniform_(0.5, 1.5)
    adapter = adapted.get_submodule("up.adapter.default")
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = model.up(x)
        scaled = (h + branch(adapter, h, F.gelu)) * scales.reshape(-1)
        assert torch.equal(adapted(x), x + model.down(torch.relu(scaled)))


def test_inactive_adapters_contribute_nothing(zoo, snapshot, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    adapted = copy.deepcopy(adapted_zoo(zoo, "builtin:tiny", snapshot))
    set_random(adapted, 16)
    base = run_model(spec.model, spec)
    with torch.no_grad():
        trained = run_model(adapted, spec)
        assert not torch.equal(trained, base)
        adapters = [m for m in adapted.modules() if isinstance(m, BottleneckAdapter)]
        assert len(adapters) == 8
        for m in adapters:
            m.active = False
        assert all(not m.down.active and not m.up.active for m in adapters)
        assert torch.equal(run_model(adapted, spec), base)
        up = adapters[0].up
        assert torch.equal(up(torch.randn(2, 3, up.in_features)), torch.zeros(2, 3, up.out_features))
        for m in adapters:
            m.active = True
        assert torch.equal(run_model(adapted, spec), trained)


# ---- errors and the audit -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SerialAdapterPass, ParallelAdapterPass])
def test_configuration_errors(cls: type) -> None:
    who = cls.__name__
    with pytest.raises(ConfigError, match=rf"{who}: give bottleneck= or reduction_factor=, not"):
        cls(bottleneck=8, reduction_factor=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"{who}: bottleneck must be a positive int, got "
                                              rf"{bad!r}"):
            cls(bottleneck=bad)
        with pytest.raises(ConfigError, match=rf"{who}: reduction_factor must be a positive int"):
            cls(reduction_factor=bad)
    with pytest.raises(ConfigError, match=r"unknown activation 'reluu'; nearest: relu"):
        cls(activation="reluu")
    with pytest.raises(ConfigError, match=rf"{who}: name must be a non-empty str"):
        cls(name="")


def test_pass_specific_configuration_errors(zoo) -> None:
    with pytest.raises(ConfigError, match=r"unknown placement 'houlsbey'; nearest: houlsby"):
        SerialAdapterPass(placement="houlsbey")
    with pytest.raises(ConfigError, match=r"role must name a sub-layer, 'ffn' or 'attention', "
                                          r"got 'ffn_down'"):
        ParallelAdapterPass(role="ffn_down")
    with pytest.raises(ConfigError, match="scaling must be a finite number"):
        ParallelAdapterPass(scaling=float("nan"))
    with pytest.raises(ConfigError, match=r"reduction_factor=128 leaves no bottleneck at "
                                          r"layers\.0\.attn\.o_proj"):
        apply_passes(zoo.spec("builtin:tiny").model, [SerialAdapterPass(reduction_factor=128)])


def test_selection_errors(zoo, snapshot) -> None:
    model = zoo.spec("builtin:tiny").model
    with pytest.raises(NoMatchError, match=r"SerialAdapterPass: pattern 'o_prj' matches no module"):
        apply_passes(model, [SerialAdapterPass(pattern="o_prj")])
    with pytest.raises(NoMatchError, match=r"ParallelAdapterPass: pattern 'o_prj' matches no "):
        apply_passes(model, [ParallelAdapterPass(pattern="o_prj")])
    with pytest.raises(NoMatchError,
                       match=r"pattern 'layers\.7\.\*\*' matches no layer of the ffn sub-layers"):
        apply_passes(model, [ParallelAdapterPass(role="ffn", pattern="layers.7.**")])
    once = adapted_zoo(zoo, "builtin:tiny", snapshot)
    with pytest.raises(AlreadyAdaptedError, match=r"layers\.0\.attn\.o_proj \(Linear\) already "
                                                  r"has an adapter named 'default' in slot "
                                                  r"'adapter'"):
        apply_passes(once, [SerialAdapterPass(bottleneck=4)])
    with pytest.raises(AlreadyAdaptedError, match=r"layers\.0\.mlp \(TinyMLP\) already has an "
                                                  r"adapter named 'default' in slot "
                                                  r"'parallel_adapter'"):
        apply_passes(once, [ParallelAdapterPass(pattern="mlp", bottleneck=4)])
    twice = apply_passes(once, [SerialAdapterPass(bottleneck=4, name="other"),
                                ParallelAdapterPass(bottleneck=4, name="other")])
    names = {(m.pass_name, m.adapter_name) for m in twice.modules() if isinstance(m, BottleneckAdapter)}
    assert names == {("serial_adapter", "default"), ("serial_adapter", "other"),
                     ("parallel_adapter", "default"), ("parallel_adapter", "other")}


def test_audit_lists_the_adapters(zoo, snapshot) -> None:
    report = audit(adapted_zoo(zoo, "builtin:tiny", snapshot))
    summary = {a.key: a for a in report.adapters}
    serial_sites = [f"layers.{i}.{p}" for i in range(2) for p in ("attn.o_proj", "mlp.down_proj")]
    assert summary["serial_adapter:default"].sites == tuple(serial_sites)
    assert summary["serial_adapter:default"].params == 4 * ((64 * 8 + 8) + (8 * 64 + 64))
    assert summary["parallel_adapter:default"].sites == tuple(
        f"layers.{i}.{p}" for i in range(2) for p in ("attn", "mlp"))
    assert summary["parallel_adapter:default"].params == 2 * ((64 * 8 + 8) + (8 * 64 + 64)) * 2
    rows = {r.name: r for r in report.rows}
    up = rows["layers.0.attn.o_proj.adapter.default.up"]
    assert (up.type, up.params, up.trainable, up.added_by) == \
        ("BottleneckProjection", 8 * 64 + 64, "yes", ("serial_adapter:default",))
    assert "serial_adapter:default: 4 site(s), 4,384 params" in str(report)

"""Tests of passes/stack.py: ``AdapterStack``, one adapter per call or one per sample.

References are the batch run with one adapter switched on (``set_active``, itself tested
against models adapted with that adapter only in ``tests/surgery/test_active.py``); a routed
batch must give, row by row, exactly the reference row of the adapter it was routed to.
LoRA and IA³ select their own rows; bottleneck adapters and the gated prefix are routed by
the stack's forward hook.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.adapters import SerialAdapterPass
from passes.merge import MergeLoRAPass
from passes.parallel_adapter import ParallelAdapterPass
from passes.prefix import PrefixPass
from passes.stack import AdapterStack, route_samples
from surgery import (
    AdapterModule,
    AdapterNotFoundError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    apply_passes,
)
from surgery.adapters.active import (
    active_adapters,
    disable_adapters,
    is_disabled,
    set_active,
)

PASSES = [
    LoRAPass(role=["query", "key", "value", "attn_out"], rank=4, name="a"),
    LoRAPass(role=["query", "value"], rank=2, name="b"),
    IA3Pass(name="c"),
    SerialAdapterPass(bottleneck=8, name="s"),
    ParallelAdapterPass(bottleneck=8, name="p"),
    PrefixPass(length=3, gate="zero", name="g"),
]
ROUTED = ["a", "b", "c", "s", "p", "g"]
IDS = torch.tensor([3, 0, 5, 1, 4, 2, 0, 3])  # every adapter, some twice
BATCH = len(IDS)


def randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * 0.1
                param.copy_(noise + 1 if ".ia3_l." in name else noise)


class Case:
    """A zoo model with the stack (plus an ungated prefix ``x``), a batch of 8, references."""

    def __init__(self, zoo, name: str) -> None:
        spec = zoo.spec(name)
        self.base = spec.model
        self.model = apply_passes(spec.model, [*PASSES, PrefixPass(length=2, name="x")],
                                  spec.example_inputs, spec.example_kwargs)
        randomize(self.model)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 128, (BATCH, 12), generator=gen)
        self.args = (ids,)
        self.kwargs = ({"attention_mask": torch.ones(BATCH, 12, dtype=torch.long)}
                       if spec.example_kwargs else {})
        self.refs = {}
        for key in [*ROUTED, "x"]:
            set_active(self.model, key)
            self.refs[key] = self.run(self.model)
        set_active(self.model, ROUTED)  # x stays off unless a test picks it

    def run(self, model: nn.Module, **kw: object) -> torch.Tensor:
        with torch.no_grad():
            out = model(*self.args, **self.kwargs, **kw)
        return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=["builtin", "hf:llama"])
def case(request, zoo) -> Case:
    return Case(zoo, request.param)


def routing_left_nothing(model: nn.Module) -> bool:
    return all(getattr(m, "route", None) is None and not m._forward_hooks
               for m in model.modules() if isinstance(m, AdapterModule))


def test_pick_one_adapter_by_index_or_name(case: Case) -> None:
    stack = AdapterStack(case.model, names=ROUTED)
    assert stack.names == tuple(ROUTED) and stack.model is case.model
    for i, key in enumerate(ROUTED):
        assert torch.equal(case.run(stack, adapter_id=i), case.refs[key]), key
        assert torch.equal(case.run(stack, adapter_id=key), case.refs[key]), key
        assert torch.equal(case.run(stack, adapter_id=torch.tensor(i)), case.refs[key]), key
    assert sorted(active_adapters(case.model)) == sorted(ROUTED)  # restored after each call
    assert routing_left_nothing(case.model)


def test_per_sample_routing_equals_per_adapter_runs(case: Case) -> None:
    stack = AdapterStack(case.model, names=ROUTED)
    out = case.run(stack, adapter_id=IDS)
    for row, k in enumerate(IDS.tolist()):
        assert torch.equal(out[row], case.refs[ROUTED[k]][row]), (row, ROUTED[k])
    assert routing_left_nothing(case.model)
    assert sorted(active_adapters(case.model)) == sorted(ROUTED)


def test_routing_keeps_gradients_per_sample(case: Case) -> None:
    for routed, other in (("a", "s"), ("p", "a")):  # self-routed, and routed by the hook
        stack = AdapterStack(case.model, names=[routed, other])
        ids = torch.tensor([1] * BATCH)  # only row 0 routed to ``routed``
        ids[0] = 0
        out = stack(*case.args, adapter_id=ids, **case.kwargs)
        (out if isinstance(out, torch.Tensor) else out.logits)[1:].sum().backward()
        grads: dict[str, list] = {routed: [], other: []}
        for m in case.model.modules():
            if isinstance(m, AdapterModule) and m.adapter_name in grads:
                grads[m.adapter_name] += [p.grad for p in m.parameters(recurse=False)]
        assert grads[routed] and grads[other]
        assert all(g is None or not g.any() for g in grads[routed]), routed  # rows 1.. never saw it
        assert any(g is not None and g.any() for g in grads[other]), other
        case.model.zero_grad(set_to_none=True)


def test_adapters_outside_the_stack_keep_their_state(case: Case) -> None:
    set_active(case.model, ["b", "c"])
    try:
        stack = AdapterStack(case.model, names=["a", "b"])  # c stays on under both
        both = case.run(stack, adapter_id="a")
        set_active(case.model, ["a", "c"])
        assert torch.equal(both, case.run(case.model))
        set_active(case.model, ["b", "c"])
        assert torch.equal(case.run(stack), case.run(case.model))  # adapter_id=None: as is
    finally:
        set_active(case.model, ROUTED)


def test_ungated_prefix_is_picked_per_call_but_not_routed(case: Case) -> None:
    stack = AdapterStack(case.model, names=[*ROUTED, "x"])
    assert torch.equal(case.run(stack, adapter_id="x"), case.refs["x"])
    with pytest.raises(ConfigError, match=r"AttentionPrefix, adapter 'x'\) gives an output of "
                                          r"shape .* when active and .* when not"):
        case.run(stack, adapter_id=torch.tensor([6, 0] * (BATCH // 2)))
    assert routing_left_nothing(case.model)
    assert sorted(active_adapters(case.model)) == sorted(ROUTED)  # x still off, as before


def test_disabling_wins_over_routing(case: Case) -> None:
    base = case.run(case.base)
    stack = AdapterStack(case.model, names=[*ROUTED, "x"])
    mods = [m for m in case.model.modules() if isinstance(m, AdapterModule)]
    with disable_adapters(case.model):
        assert torch.equal(case.run(stack, adapter_id="x"), base)  # x, although off before
        assert torch.equal(case.run(stack, adapter_id=0), base)
        assert torch.equal(case.run(stack, adapter_id=IDS), base)
        with route_samples(case.model, {"a": IDS == 0, "p": IDS == 4,
                                        "s": torch.ones(BATCH, dtype=torch.bool)}):
            assert torch.equal(case.run(case.model), base)
        assert active_adapters(case.model) == [] and all(is_disabled(m) for m in mods)
        assert routing_left_nothing(case.model)
    assert not any(is_disabled(m) for m in mods)
    assert sorted(active_adapters(case.model)) == sorted(ROUTED)
    assert torch.equal(case.run(stack, adapter_id="x"), case.refs["x"])  # routing is back


@pytest.mark.parametrize(("adapter_id", "error", "match"), [
    pytest.param(7, ConfigError, r"adapter_id 7 is out of range: the stack holds 6 adapters "
                                 r"\(0: 'a', 1: 'b', 2: 'c', 3: 's', 4: 'p', 5: 'g'\)", id="int"),
    pytest.param(-1, ConfigError, "adapter_id -1 is out of range", id="negative"),
    pytest.param("ss", AdapterNotFoundError, r"no adapter named 'ss' in the stack; it holds "
                                             r"\(nearest first\): 's', ", id="name"),
    pytest.param(torch.tensor([0, 1, 2]), ConfigError,
                 "adapter_id holds 3 ids but the batch has 8 samples", id="length"),
    pytest.param(torch.tensor([0, 6, 1, 9, 0, 0, 0, 0]), ConfigError,
                 r"adapter_id values \[6, 9\] are out of range", id="ids"),
    pytest.param(torch.zeros(BATCH), ConfigError, "must be an integer tensor of shape",
                 id="float"),
    pytest.param(torch.zeros(2, 4, dtype=torch.long), ConfigError,
                 r"got torch.int64 of shape \(2, 4\)", id="2d"),
    pytest.param(True, ConfigError, "adapter_id must be an int, a name", id="bool"),
])
def test_bad_adapter_ids(case: Case, adapter_id: object, error: type, match: str) -> None:
    stack = AdapterStack(case.model, names=ROUTED)
    with pytest.raises(error, match=match):
        case.run(stack, adapter_id=adapter_id)
    assert routing_left_nothing(case.model)


def test_bad_stacks(zoo) -> None:
    plain = zoo.spec("builtin").model
    model = apply_passes(plain, [LoRAPass(rank=2, name="sst2"), LoRAPass(rank=2, name="mnli")])
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'sts2'; adapters present "
                                                   r"\(nearest first\): 'sst2', 'mnli'"):
        AdapterStack(model, names=["sts2"])
    with pytest.raises(ConfigError, match="names must not repeat"):
        AdapterStack(model, names=["sst2", "sst2"])
    with pytest.raises(ConfigError, match="names must be a list of adapter names"):
        AdapterStack(model, names="sst2")
    with pytest.raises(ConfigError, match="names is empty"):
        AdapterStack(model, names=[])
    with pytest.raises(ConfigError, match="carries no adapter"):
        AdapterStack(plain)
    assert AdapterStack(model).names == ("sst2", "mnli")  # None: all, in model order
    assert "0: 'sst2', 1: 'mnli'" in repr(AdapterStack(model))


def test_merged_adapter_cannot_be_left_out(zoo) -> None:
    model = apply_passes(zoo.spec("builtin").model, [LoRAPass(rank=2, name="a"),
                                                     LoRAPass(rank=2, name="b")])
    merged = apply_passes(model, [MergeLoRAPass(names=["a"])])
    stack = AdapterStack(merged, names=["a", "b"])
    ids = torch.zeros(2, 16, dtype=torch.long)
    stack(ids, adapter_id="a")
    with pytest.raises(MergeError, match="adapter 'a' is merged into the weights"):
        stack(ids, adapter_id="b")
    with pytest.raises(MergeError, match="route_samples: adapter 'a' is merged"):
        stack(ids, adapter_id=torch.tensor([0, 1]))


class Flat(nn.Module):
    """Calls its layer on ``(batch · seq, features)``: samples cannot be told apart there."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(-1, 8)).reshape(x.shape)


def test_flattened_batch_cannot_be_routed() -> None:
    model = apply_passes(Flat(), [LoRAPass(pattern="proj", name="a"),
                                  LoRAPass(pattern="proj", name="b")])
    stack = AdapterStack(model)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ConfigError, match=r"proj \(LoRAProjection, adapter '[ab]'\) sees a tensor "
                                          r"of shape \(6, 8\) whose leading dimension is not "
                                          r"the batch size 2"):
        stack(x, adapter_id=torch.tensor([0, 1]))
    assert routing_left_nothing(model)
    assert torch.equal(stack(x, adapter_id=1), stack(x, adapter_id="b"))


def test_route_samples_directly(zoo) -> None:
    model = apply_passes(zoo.spec("builtin").model, [LoRAPass(rank=2, name="a"),
                                                     IA3Pass(name="c")])
    randomize(model)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    with route_samples(model, {"a": torch.tensor([True, False, True])}) as routed:
        out = routed(ids)
    set_active(model, "c")
    without_a = model(ids)
    set_active(model, None)
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
    assert torch.equal(out[1], without_a[1])
    assert not torch.equal(out[1], full[1])
    assert routing_left_nothing(model)

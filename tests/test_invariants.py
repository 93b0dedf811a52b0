"""The invariants of the design, for every (model, pass) of the foundation table.

1. the caller's model is unchanged (values, ``requires_grad``, submodules, ``training``,
   no ``.grad``), whether it was a plain module or an already adapted one;
2. a pass that raises leaves the model it was given exactly as it was, also with
   ``inplace=True`` on an adapted model;
3. outputs are bitwise equal at init, in evaluation mode;
4. exactly the adapter parameters train, and their names follow from the selection;
5. gradients reach every adapter parameter (LoRA's ``A`` once ``B`` is non-zero).

Models: the built-in TinyTransformer (map by torch.fx), a torchvision-style CNN + MLP
(torch.fx, selected by pattern since it has no attention), ``nn.TransformerEncoder``, GPT-2,
LLaMA and BERT (map by torch.export). In every case the adapted model is an object of the
caller's class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from surgery import (
    AlreadyAdaptedError,
    IA3Pass,
    LoRAPass,
    NoMatchError,
    Pass,
    UnsupportedSiteError,
    apply_passes,
    named_trainable_parameters,
    trainable_parameters,
)
from surgery.sites.params import share_weights_copy


def _layers(template: str, n: int = 2) -> list[str]:
    return [template.format(i=i) for i in range(n)]


@dataclass(frozen=True)
class Row:
    """One model of the table with the pattern it is adapted by and the sites expected."""

    model: str
    lora_pattern: str | list[str]
    lora_pattern_sites: list[str]
    ia3_sites: list[str]
    lora_default_sites: list[str] | None = None  # None: the default raises ``default_error``
    default_error: type[Exception] | None = None
    ia3_pattern: str | None = None  # IA3 by name, input scaling (a model without roles)
    bitwise_against_frozen: bool = False  # see _reference


ROWS = {
    "builtin:tiny": Row(
        "builtin:tiny", "attn.*",
        [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"],
        [f"layers.{i}.{s}" for i in range(2) for s in ("attn.k_proj", "attn.v_proj", "mlp.down_proj")],
        lora_default_sites=[f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"],
    ),
    "builtin:convnet": Row(
        "builtin:convnet", "classifier.*", ["classifier.0", "classifier.3"], ["classifier.3"],
        default_error=NoMatchError, ia3_pattern="classifier.3",
    ),
    "builtin:encoder": Row(
        "builtin:encoder", "linear*",
        [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)],
        _layers("layers.{i}.linear2"),
        default_error=UnsupportedSiteError, bitwise_against_frozen=True,
    ),
    "hf:gpt2": Row(
        "hf:gpt2", "attn.*",
        [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")],
        [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_proj")],
        lora_default_sites=_layers("transformer.h.{i}.attn.c_attn"),
    ),
    "hf:llama": Row(
        "hf:llama", ["mlp.*", "o_proj"],
        [f"model.layers.{i}.{p}" for i in range(2)
         for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
        [f"model.layers.{i}.{p}" for i in range(2)
         for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")],
        lora_default_sites=[f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"],
    ),
    "hf:bert": Row(
        "hf:bert", "attention.**",
        [f"encoder.layer.{i}.attention.{p}" for i in range(2)
         for p in ("self.query", "self.key", "self.value", "output.dense")],
        [f"encoder.layer.{i}.{p}" for i in range(2)
         for p in ("attention.self.key", "attention.self.value", "output.dense")],
        lora_default_sites=[f"encoder.layer.{i}.attention.self.{p}" for i in range(2)
                            for p in ("query", "value")],
    ),
}
MODELS = list(ROWS)
PASSES = ["lora", "lora_pattern", "ia3", "lora+ia3"]


def _ia3(row: Row, name: str = "default") -> IA3Pass:
    """The row's IA³ pass: by role, or by name where the model has no roles."""
    if row.ia3_pattern:
        return IA3Pass(pattern=row.ia3_pattern, feedforward=row.ia3_pattern, name=name)
    return IA3Pass(name=name)


def _passes(row: Row, which: str) -> tuple[list[Pass], set[str]]:
    """The passes of a table cell and the adapter parameter names they must create."""
    lora_names = lambda sites: {f"{s}.lora_{f}.default.weight" for s in sites for f in "AB"}  # noqa: E731
    ia3_names = {f"{s}.ia3_l.default" for s in row.ia3_sites}
    if which == "lora":
        return [LoRAPass()], lora_names(row.lora_default_sites or [])
    if which == "lora_pattern":
        return [LoRAPass(pattern=row.lora_pattern, rank=4, alpha=16)], lora_names(row.lora_pattern_sites)
    ia3 = _ia3(row)
    if which == "ia3":
        return [ia3], ia3_names
    return ([LoRAPass(pattern=row.lora_pattern, rank=4, alpha=16), ia3],
            lora_names(row.lora_pattern_sites) | ia3_names)


CELLS = [pytest.param(m, p, id=f"{m}-{p}") for m in MODELS for p in PASSES
         if p != "lora" or ROWS[m].lora_default_sites is not None]


def _adapt(zoo, model: str, passes: list[Pass], given: nn.Module | None = None) -> nn.Module:
    """``apply_passes`` on the zoo model (or ``given``), with its example inputs for the map."""
    spec = zoo.spec(model)
    adapted = apply_passes(spec.model if given is None else given, passes, spec.example_inputs,
                           spec.example_kwargs or None)
    assert type(adapted) is type(spec.model), "the adapted model is the caller's class"
    return adapted


def _cell(zoo, model: str, which: str) -> tuple[Row, list[Pass], set[str]]:
    row = ROWS[model]
    passes, expected = _passes(row, which)
    return row, passes, expected


@pytest.mark.parametrize("model", [m for m in MODELS if ROWS[m].lora_default_sites is None])
def test_default_lora_without_attention_projections_raises(zoo, snapshot, model: str) -> None:
    row = ROWS[model]
    spec = zoo.spec(model)
    before = snapshot(spec.model)
    # the error offers pattern= as the way out (naming the model where it has no attention)
    with pytest.raises(row.default_error, match=r"LoRAPass: no nn.Linear / Conv1D module "
                                                r"(of this \w+ )?plays default role\(s\) "
                                                r"\['query', 'value'\].*pattern="):
        apply_passes(spec.model, [LoRAPass()], spec.example_inputs)
    before.assert_unchanged(spec.model)


def _reference(row: Row, spec, run_model) -> torch.Tensor:
    """The caller's eager output in eval mode.

    ``nn.MultiheadAttention`` projects a transposed (non-contiguous) input, and PyTorch's
    ``matmul`` picks its kernel from the operands' ``requires_grad`` flags (not from grad
    mode); the adapted model's frozen base weights therefore take the other kernel, which
    rounds differently. Its reference is the same model with the same flags.
    """
    model = spec.model
    if row.bitwise_against_frozen:
        model = copy.deepcopy(model).requires_grad_(False)
    return run_model(model, spec)


def _randomise_lora_b(model: nn.Module) -> None:
    from passes.modules import LoRAProjection

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoRAProjection) and mod.factor == "B":
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.1)


# ---- 1. the caller's model is unchanged ------------------------------------------------


@pytest.mark.parametrize("model,which", CELLS)
def test_adapted_caller_unchanged(zoo, snapshot, run_model, model: str, which: str) -> None:
    row, passes, _ = _cell(zoo, model, which)
    caller = _adapt(zoo, model, [LoRAPass(pattern=row.lora_pattern_sites[0], name="first")])
    before = snapshot(caller)
    adapted = _adapt(zoo, model, passes, given=caller)
    assert adapted is not caller
    _randomise_lora_b(adapted)
    adapted.train()
    run_model(adapted, zoo.spec(model)).float().pow(2).mean().backward()
    before.assert_unchanged(caller)


@pytest.mark.parametrize("model", MODELS)
def test_plain_caller_unchanged_and_storage_shared(zoo, snapshot, run_model, model: str) -> None:
    spec = zoo.spec(model)
    caller = spec.model
    before = snapshot(caller)
    adapted = apply_passes(caller, _passes(ROWS[model], "lora+ia3")[0], spec.example_inputs,
                           spec.example_kwargs or None)
    adapted.train()
    _randomise_lora_b(adapted)
    run_model(adapted, spec).float().pow(2).mean().backward()
    before.assert_unchanged(caller)
    ours = {n: p for n, p in caller.named_parameters()}
    theirs = dict(adapted.named_parameters())
    shared = [n for n in ours if n in theirs]
    assert len(shared) == len(ours), "every base parameter keeps its name in the adapted model"
    for name in shared:
        assert theirs[name] is not ours[name], f"{name}: the adapted model needs its own Parameter"
        assert theirs[name].data_ptr() == ours[name].data_ptr(), f"{name}: storage must be shared"


# ---- 2. atomic on failure ----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_failing_pass_leaves_inplace_adapted_model_unchanged(zoo, snapshot, model: str) -> None:
    row = ROWS[model]
    work = _adapt(zoo, model, [LoRAPass(pattern=row.lora_pattern)])
    before = snapshot(work)
    with pytest.raises(AlreadyAdaptedError, match="already has an adapter named 'default' in slot 'lora_A'"):
        apply_passes(work, [_ia3(row), LoRAPass(pattern=row.lora_pattern)], inplace=True)
    before.assert_unchanged(work)
    patterns = [row.lora_pattern] if isinstance(row.lora_pattern, str) else list(row.lora_pattern)
    with pytest.raises(NoMatchError, match="'no_such_layer'"):
        apply_passes(work, [_ia3(row, "x"), LoRAPass(pattern=patterns + ["no_such_layer"], name="y")],
                     inplace=True)
    before.assert_unchanged(work)


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:convnet", "hf:gpt2"])
def test_failing_pass_leaves_plain_model_unchanged(zoo, snapshot, model: str) -> None:
    spec = zoo.spec(model)
    caller = spec.model
    before = snapshot(caller)
    with pytest.raises(NoMatchError, match="'no_such_layer'"):
        apply_passes(caller, [_ia3(ROWS[model]),
                              LoRAPass(pattern=[ROWS[model].lora_pattern_sites[0], "no_such_layer"])],
                     spec.example_inputs)
    before.assert_unchanged(caller)


# ---- 3. identity at init -------------------------------------------------------------------


@pytest.mark.parametrize("model,which", CELLS)
def test_outputs_bitwise_equal_at_init(zoo, run_model, no_mha_fastpath, model: str, which: str) -> None:
    row, passes, _ = _cell(zoo, model, which)
    spec = zoo.spec(model)
    adapted = _adapt(zoo, model, passes)
    adapted.eval()
    expected = _reference(row, spec, run_model)
    got = run_model(adapted, spec)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item():.3g}"
    with torch.no_grad():
        assert torch.equal(run_model(adapted, spec), expected)


# ---- 4. exactly the adapter parameters train ------------------------------------------------


@pytest.mark.parametrize("model,which", CELLS)
def test_exactly_adapter_parameters_trainable(zoo, model: str, which: str) -> None:
    row, passes, expected = _cell(zoo, model, which)
    adapted = _adapt(zoo, model, passes)
    names = [n for n, _ in named_trainable_parameters(adapted)]
    assert sorted(names) == sorted(expected)
    assert len(trainable_parameters(adapted)) == len(expected)
    frozen = [n for n, p in adapted.named_parameters() if not p.requires_grad]
    base = [n for n, _ in zoo.spec(model).model.named_parameters()]
    assert sorted(frozen) == sorted(base), "every base parameter is frozen, nothing else"


# ---- 5. gradients reach every adapter parameter ------------------------------------------


@pytest.mark.parametrize("model,which", CELLS)
def test_gradients_reach_every_adapter_parameter(zoo, run_model, model: str, which: str) -> None:
    _, passes, expected = _cell(zoo, model, which)
    adapted = _adapt(zoo, model, passes)
    adapted.train()
    _randomise_lora_b(adapted)
    run_model(adapted, zoo.spec(model)).float().pow(2).mean().backward()
    for name, param in named_trainable_parameters(adapted):
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert all(p.grad is None for _, p in adapted.named_parameters() if not p.requires_grad)
    assert {n for n, _ in named_trainable_parameters(adapted)} == expected


def test_copy_of_adapted_model_shares_base_storage_and_is_independent(zoo) -> None:
    adapted = _adapt(zoo, "hf:gpt2", [LoRAPass()])
    copied = share_weights_copy(adapted)
    assert type(copied) is type(adapted)
    for (name, p), (_, q) in zip(adapted.named_parameters(), copied.named_parameters(), strict=True):
        assert p is not q, name
        if p.requires_grad:  # adapters are trained in place: never shared
            assert p.data_ptr() != q.data_ptr() and torch.equal(p, q), name
        else:
            assert p.data_ptr() == q.data_ptr(), name

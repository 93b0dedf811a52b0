"""Running a drawn pipeline step by step, checking the failure contract of each step.

:func:`run_step` runs one :class:`~properties.pipelines.Step` on the current model and
returns the next one. On failure it checks invariant 2 (atomic, typed errors): the error is
a ``SurgeryError`` whose message names the pass or operation, and the model given is
exactly as it was. It also keeps :class:`Expectations`: which adapter names are not
promised to be identity at init, and which modules are trained fully.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import surgery
from conftest import ModelSnapshot
from properties.models import ModelCase
from properties.pipelines import PRESENT, PassSpec, Step

__all__ = ["Expectations", "names_in_model", "outputs", "run_step"]

_EXACT_INITS = ("kaiming", "gaussian")


@dataclass
class Expectations:
    """What the steps that succeeded promise.

    Attributes:
        inexact: adapter names whose pass does not promise bitwise identity at init (LoRA
            inits other than kaiming / gaussian, DoRA, an ungated prefix of length > 0);
            while one of them is in the model, outputs are compared only for shape.
        trained_modules: qualified names of modules trained fully.
        failures: ``(step, error)`` of the steps that raised, for reports.
    """

    inexact: set[str] = field(default_factory=set)
    trained_modules: set[str] = field(default_factory=set)
    failures: list[tuple[Step, str]] = field(default_factory=list)


def names_in_model(model: nn.Module) -> set[str]:
    """Adapter names present in ``model``."""
    return set(surgery.adapter_names(model)) if hasattr(model, "_surgery") else set()


def _inexact(spec: PassSpec) -> bool:
    if spec.cls == "LoRAPass":
        return spec.get("init", "kaiming") not in _EXACT_INITS or bool(spec.get("use_dora"))
    if spec.cls == "PrefixPass":
        return spec.get("length", 0) > 0 and spec.get("gate") is None
    return False


def _who(step: Step, built: list[surgery.Pass]) -> list[str]:
    """Names a failure message of ``step`` may start from."""
    if step.op == "apply":
        return [type(p).__name__ for p in built]
    return {"set_active": ["set_active"], "combine": ["combine_adapters"],
            "delete": ["delete_adapter"],
            "save_load": ["save_adapters", "load_adapters"]}[step.op]


def _build(step: Step, exp: Expectations) -> list[surgery.Pass] | None:
    """The step's passes, or ``None`` when one is refused at construction as expected."""
    built = []
    for spec in step.passes:
        if spec.invalid:
            try:
                spec.build()
            except surgery.ConfigError as exc:
                assert spec.cls in str(exc), f"{spec!r}: message does not name the pass: {exc}"
                exp.failures.append((step, f"refused at construction: {exc}"))
                return None
            raise AssertionError(f"{spec!r} was accepted; its setting is invalid")
        built.append(spec.build())
    return built


def _present(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Adapter name -> passes, of the adapters ``model`` carries."""
    return surgery.adapter_names(model) if hasattr(model, "_surgery") else {}


def _resolve(step: Step, model: nn.Module) -> Step:
    """``step`` with :data:`PRESENT` replaced by adapters ``model`` carries: up to two LoRA
    adapters for ``combine`` (``"missing"`` when there are none), the first adapter for
    ``delete``."""
    args = dict(step.args)
    if step.op == "combine" and isinstance(args["weights"], list):
        lora = [n for n, kinds in _present(model).items() if "lora" in kinds][:2]
        args["weights"] = dict(zip(lora, args["weights"])) or {"missing": 1.0}
    elif step.op == "delete" and args["name"] == PRESENT:
        args["name"] = next(iter(_present(model)), "missing")
    return dataclasses.replace(step, args=args)


def _call(step: Step, built: list[surgery.Pass], model: nn.Module, case: ModelCase
          ) -> nn.Module:
    inputs = case.inputs if step.with_inputs else None
    if step.op == "apply":
        return surgery.apply_passes(model, built, example_inputs=inputs)
    if step.op == "set_active":
        out = surgery.set_active(model, step.args["names"])
        assert out is model, "set_active returns the model it switched"
        return out
    if step.op == "combine":
        return surgery.combine_adapters(model, step.args["weights"], step.args["method"],
                                        step.args["name"])
    if step.op == "delete":
        return surgery.delete_adapter(model, step.args["name"])
    with tempfile.TemporaryDirectory() as tmp:
        surgery.save_adapters(model, tmp, step.args["names"])
        return surgery.load_adapters(case.model, tmp, step.args["names"],
                                     example_inputs=case.inputs)


def run_step(step: Step, model: nn.Module, case: ModelCase, exp: Expectations) -> nn.Module:
    """Run ``step`` on ``model``; return the new model (``model`` itself when it raised).

    Raises:
        AssertionError: an untyped error, a message not naming the pass or operation, a
            model changed by a step that raised or by one that promises not to change it,
            an expected error not raised.
    """
    step = _resolve(step, model)
    built = _build(step, exp)
    if built is None:
        return model
    before = ModelSnapshot.of(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _call(step, built, model, case)
    except surgery.SurgeryError as exc:
        who = _who(step, built)
        assert any(w in str(exc) for w in who), \
            f"{step!r} raised {type(exc).__name__} without naming {who}: {exc}"
        if step.expect is not None:
            assert isinstance(exc, step.expect), \
                f"{step!r} raised {type(exc).__name__}, expected {step.expect.__name__}: {exc}"
        before.assert_unchanged(model)
        exp.failures.append((step, f"{type(exc).__name__}: {exc}"))
        return model
    except Exception as exc:  # noqa: BLE001  (the property under test: only typed errors)
        raise AssertionError(f"{step!r} raised an untyped {type(exc).__name__}: {exc}") from exc
    assert step.expect is None, f"{step!r} did not raise {step.expect.__name__}"
    if step.op != "set_active":  # a mode switch, in place by design
        before.assert_unchanged(model)
        assert out is not model, f"{step!r} returned the model it was given"
    _record(step, built, out, exp)
    return out


def _record(step: Step, built: list[surgery.Pass], out: nn.Module, exp: Expectations) -> None:
    present = names_in_model(out)
    if step.op == "apply":
        for spec in step.passes:
            if _inexact(spec):
                exp.inexact.add(spec.get("name", "default"))
            if spec.cls == "TrainModulePass":
                pat = spec.get("pattern")
                exp.trained_modules.update([pat] if isinstance(pat, str) else pat)
    elif step.op == "combine":
        if set(step.args["weights"]) & exp.inexact:
            exp.inexact.add(step.args["name"])
        else:  # a new adapter of exact sources replaces any earlier one of that name
            exp.inexact.discard(step.args["name"])
    exp.inexact &= present
    if not hasattr(out, "_surgery"):
        exp.trained_modules.clear()


def outputs(model: nn.Module, case: ModelCase) -> torch.Tensor:
    """The model's output on the case's inputs, without gradients."""
    with torch.no_grad():
        return model(*case.inputs)

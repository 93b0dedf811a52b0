"""The invariants of the design (DESIGN.md, "Invariants") over drawn models × pipelines.

For every drawn model (MLP, Conv2d stack, hand-written transformer; float32 or bfloat16) and
pipeline (passes with valid and invalid settings, ``set_active``, ``combine_adapters``,
``delete_adapter``, ``save_adapters`` / ``load_adapters``), after every step:

(a) the caller's model is unchanged: parameter values bit for bit, ``requires_grad``,
    submodules, buffers, state-dict keys; so is the model the step was given (except
    ``set_active``, a mode switch in place);
(b) a step that raises raises a ``SurgeryError`` subclass naming the pass or operation and
    leaves the model it was given as it was (:func:`properties.runner.run_step`);
(c) outputs equal the base model's bit for bit while every adapter present promises
    identity at init (LoRA kaiming / gaussian with ``B = 0``, dropout in evaluation mode,
    IA³ ones, bottleneck adapters with ``up = 0``, zero-gated or empty prefixes);
(d) exactly the adapter parameters (and modules trained fully) train, and gradients reach
    them;
(e) merge then unmerge restores the base weights bit for bit, merged outputs within
    :data:`properties.checks.MERGE_TOLERANCE` of unmerged (on adapters with random values);
(f) save / load of the adapters reproduces outputs bit for bit (random adapter values).

Run more examples with ``pytest tests/properties --hypothesis-profile=deep``.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conftest import ModelSnapshot
from properties.checks import (
    check_identity,
    check_merge_round_trip,
    check_save_load,
    check_trainable,
)
from properties.models import ModelCase, models
from properties.pipelines import Step, pipelines
from properties.runner import Expectations, outputs, run_step

_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(case: ModelCase, steps: list[Step]) -> Expectations:
    """Run ``steps`` on ``case``, checking (a)–(d) after each and (e)–(f) at the end."""
    base_snap = ModelSnapshot.of(case.model)
    base_keys = list(case.model.state_dict())
    base_out = outputs(case.model, case)
    exp = Expectations()
    model = case.model
    for i, step in enumerate(steps):
        note(f"step {i}: {step!r}")
        failed = len(exp.failures)
        model = run_step(step, model, case, exp)
        outcome = (exp.failures[-1][1].split(":")[0] if len(exp.failures) > failed
                   else "ok")
        event(f"{step.op} {'+'.join(s.cls for s in step.passes)}: {outcome}")
        base_snap.assert_unchanged(case.model)
        assert list(case.model.state_dict()) == base_keys, "the caller's state-dict keys changed"
        if model is case.model:
            continue
        check_identity(model, case, base_out, exp)
        check_trainable(model, case, exp)
    if model is not case.model:
        event(f"merge round trip ran: {check_merge_round_trip(model, case)}")
        event(f"save/load round trip ran: {check_save_load(model, case)}")
    base_snap.assert_unchanged(case.model)
    return exp


@_SETTINGS
@given(st.data())
def test_pipelines_keep_the_invariants(data: st.DataObject) -> None:
    case = data.draw(models(), label="model")
    steps = data.draw(pipelines(case), label="pipeline")
    with torch.random.fork_rng():  # passes draw initial adapter values from torch's generator
        torch.manual_seed(0)
        _run(case, steps)

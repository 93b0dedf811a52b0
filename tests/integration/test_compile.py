"""``torch.compile`` of an adapted model: one graph, eager's outputs, eager's gradients.

The main tests compile with ``backend="aot_eager"`` and ``fullgraph=True``: TorchDynamo
captures the whole forward (site graphs included, with no graph break) and AOTAutograd
traces the joint forward and backward, which is where an adapted model could fail to
compile; the captured operations then run eagerly, so outputs and adapter gradients equal
eager mode bit for bit. Inductor works on this CPU (a C++ compiler is present), but its
code generation makes one compiled train step of TinyTransformer or LLaMA take over a
minute on two cores; its kernels are checked on the MLP, in a slow test, within a
tolerance (they reorder float32 sums).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from integration.cases import CASES, adapter_grads, base_grads, build
from integration.grads import assert_grads_close, relative_error


def _output(model: nn.Module, batch: Tensor) -> Tensor:
    out = model(batch)
    return out if isinstance(out, Tensor) else out.logits


def _compiled_step(name: str, backend: str) -> tuple[Tensor, Tensor, dict, dict, nn.Module]:
    """Eager and compiled outputs and adapter gradients of one train step of case ``name``."""
    torch._dynamo.reset()
    case = build(name)
    want = _output(case.model, case.batch).detach()
    case.loss(case.model, case.batch).backward()
    want_grads = adapter_grads(case.model)
    case.model.zero_grad(set_to_none=True)
    compiled = torch.compile(case.model, backend=backend, fullgraph=True)
    got = _output(compiled, case.batch).detach()
    case.loss(compiled, case.batch).backward()
    return got, want, adapter_grads(case.model), want_grads, case.model


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "llama" else n
                                  for n in CASES])  # LLaMA: about 20 s of tracing
def test_aot_eager_matches_eager_bit_for_bit(name: str) -> None:
    got, want, grads, want_grads, model = _compiled_step(name, "aot_eager")
    assert torch.equal(got, want)
    assert grads.keys() == want_grads.keys()
    for n in want_grads:
        assert torch.equal(grads[n], want_grads[n]), n
    assert base_grads(model) == []


@pytest.mark.slow
def test_inductor_matches_eager_on_the_mlp() -> None:
    got, want, grads, want_grads, model = _compiled_step("mlp", "inductor")
    assert relative_error(got, want) <= 1e-6
    assert_grads_close(grads, want_grads, rtol=1e-5)
    assert base_grads(model) == []

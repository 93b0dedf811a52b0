"""Comparing gradient dictionaries with a stated tolerance."""

from __future__ import annotations

from torch import Tensor

__all__ = ["assert_grads_close", "relative_error"]


def relative_error(got: Tensor, want: Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 (Frobenius norms), 0 when both are zero."""
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale else diff


def assert_grads_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    """Same names, and each gradient within ``rtol`` of the reference in relative norm.

    A norm-wise tolerance: elementwise relative errors blow up on entries that are zero up
    to rounding, which float32 sums over a batch produce.
    """
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
    for name, g in want.items():
        assert got[name].shape == g.shape and got[name].dtype == g.dtype, name
        err = relative_error(got[name], g)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"

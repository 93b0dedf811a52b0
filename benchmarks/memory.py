"""New storage while applying: torch's CPU allocator (profiler memory events) and the Python
heap (tracemalloc), each relative to the moment applying starts.

Only new storage counts: the model's own weights exist before and are not counted; what the
adapted model adds (adapter parameters, copied buffers, module objects, graphs) and whatever
applying allocates and frees again (a traced map, a copy) are.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cases import WAYS, Case, build, fresh_input, weight_bytes
from torch.profiler import ProfilerActivity, profile


def torch_memory(fn: Callable[[], Any]) -> tuple[int, int]:
    """Run ``fn`` under the profiler: ``(peak, held)`` bytes of torch's CPU allocator.

    From the profiler's memory events in time order, relative to the start; ``held`` is
    measured after a garbage collection with ``fn``'s result still alive, so reference
    cycles ``fn`` left behind count towards the peak but not towards what is held.
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        gc.collect()
    del result
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak, current


def python_memory(fn: Callable[[], Any]) -> tuple[int, int]:
    """Run ``fn`` under tracemalloc: ``(peak, held)`` bytes of the Python heap (module
    objects, graphs, nodes; tensor storage is not on it), relative to the start, ``held``
    with ``fn``'s result alive after a garbage collection."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - before, current - before


@dataclass
class ApplyMemory:
    """New storage while one way adapts a model, in bytes."""

    weights: int          # the plain model's parameter and buffer storage
    peak: int             # allocator peak while applying
    held: int             # allocator bytes the adapted model still holds
    py_peak: int          # Python heap peak while applying
    py_held: int          # Python heap the adapted model still holds

    @property
    def multiple(self) -> float:
        """Peak memory while applying as a multiple of the weight bytes (tensor storage)."""
        return (self.weights + self.peak) / self.weights

    @property
    def multiple_with_heap(self) -> float:
        """The same, adding the Python heap's peak (an upper bound: the two peaks are
        measured in separate runs and need not coincide)."""
        return (self.weights + self.peak + self.py_peak) / self.weights


def apply_memory(c: Case, ways: list[str]) -> dict[str, ApplyMemory]:
    """New storage while each way in ``ways`` adapts the plain model of case ``c``, after a
    warm-up run of each (lazy imports and first-call caches are not counted). Ways that
    raise are left out (:func:`timing.time_apply` reports them)."""
    base = build(c)
    weights = weight_bytes(base)
    out = {}
    for name in ways:
        way = WAYS[name]
        try:
            way.run(c, fresh_input(way, base))
        except Exception:  # noqa: BLE001, S112 (a pass being ported; time_apply reports it)
            continue
        first, second = fresh_input(way, base), fresh_input(way, base)
        py_peak, py_held = python_memory(lambda way=way, m=first: way.run(c, m))
        peak, held = torch_memory(lambda way=way, m=second: way.run(c, m))
        del first, second
        out[name] = ApplyMemory(weights, peak, held, py_peak, py_held)
    return out

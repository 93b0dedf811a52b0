"""Which architectures the zoo tests run, and one shared case per architecture.

Every zoo test is marked ``zoo`` and parametrized by ``model_type``. By default only
:data:`SAMPLE` runs (the rest is deselected, and pytest reports how many), without the tests
marked ``zoo_all`` as well; ``--zoo=all`` or ``-m zoo`` runs every test on every
architecture, ``--zoo=gpt2,t5`` every test on the ones named.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

SAMPLE = ("gpt2", "llama", "qwen3_moe", "bert", "t5", "vit")
"""The default run: a fused-projection decoder, a rotary GQA decoder, a MoE decoder, an
encoder, an encoder-decoder and a vision model."""


def _wanted(config: pytest.Config) -> set[str] | None:
    """The model types to run, or ``None`` for all of them."""
    option = config.getoption("--zoo")
    if option == "all" or "zoo" in (config.getoption("-m") or ""):
        return None
    if option == "sample":
        return set(SAMPLE)
    return {name.strip() for name in option.split(",") if name.strip()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect zoo tests of architectures outside the chosen set (tests that take no
    architecture always run)."""
    wanted = _wanted(config)
    if wanted is None:
        return
    sample = config.getoption("--zoo") == "sample"
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        model_type = params.params.get("model_type") if params else None
        skip = item.get_closest_marker("zoo") is not None and model_type is not None and (
            model_type not in wanted or (sample and item.get_closest_marker("zoo_all")))
        (drop if skip else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="package")
def case_for() -> Callable[[str], object]:
    """``case_for(model_type)``: the shared :class:`checks.Case` of an architecture (its
    base model is never changed by the checks; the PEFT pair is cached on it)."""
    from zoo.checks import make_case

    cases: dict[str, object] = {}

    def get(model_type: str) -> object:
        if model_type not in cases:
            cases[model_type] = make_case(model_type)
        return cases[model_type]

    return get

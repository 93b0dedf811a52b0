"""surgery/map/wrappers.py: a model in a ``torch.compile`` wrapper, or holding a compiled
block, is mapped and drawn as the bare model, and is never written to."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery import LoRAPass, apply_passes
from surgery.map.wrappers import is_compiled, unwrap


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_unwrap_takes_off_compile_and_data_parallel() -> None:
    bare = _mlp()
    wrapped = nn.DataParallel(torch.compile(bare))
    assert is_compiled(wrapped.module) and not is_compiled(bare)
    inner, notes = unwrap(wrapped)
    assert inner is bare and len(notes) == 2
    assert "DataParallel" in notes[0] and "torch.compile" in notes[1]


def test_listing_a_compiled_model_leaves_it_whole(snapshot) -> None:
    bare = _mlp()
    before = snapshot(bare)
    names = [t.qname for t in surgery.list_targets(torch.compile(bare))]
    assert names == ["0", "2"]
    before.assert_unchanged(bare)
    assert [n for n, _ in bare.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_compiled_block_inside_is_mapped_and_left_whole(snapshot) -> None:
    model = _mlp()
    model[2] = torch.compile(model[2])
    before = snapshot(model)
    surgery.list_targets(model)
    before.assert_unchanged(model)
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 2)


def test_drawing_a_compiled_model_leaves_the_models_whole(tmp_path, snapshot) -> None:
    from visualize import render, render_diff, report

    model = _mlp()
    adapted = apply_passes(model, [LoRAPass(pattern="0", rank=2)])
    x = torch.randn(3, 4)
    y = adapted(x)
    before, after = snapshot(model), snapshot(adapted)
    for pair in ((model, torch.compile(adapted)), (torch.compile(model), adapted)):
        got = render_diff(*pair, tmp_path / "diff")
        assert [r.name for r in got.added] == ["0.lora_A.default.weight",
                                              "0.lora_B.default.weight"]
        report(*pair, tmp_path / "report.html")
    render(torch.compile(adapted), tmp_path / "one.dot")
    before.assert_unchanged(model)
    after.assert_unchanged(adapted)
    assert torch.equal(adapted(x), y)

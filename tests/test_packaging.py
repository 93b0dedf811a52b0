"""The wheel holds every package of the source tree and the report's assets: an editable
install (what the tests run on) would hide a package left out of pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_in_the_wheel() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(REPO), include=config["packages"]["find"]["include"]))
    want = {str(p.parent.relative_to(REPO)).replace("/", ".")
            for top in ("surgery", "passes", "visualize")
            for p in (REPO / top).rglob("__init__.py")}
    assert found == want
    assert {"surgery.map", "surgery.sites", "surgery.adapters", "surgery.checkpoint"} <= found
    data = config["package-data"]["visualize"]
    shipped = {p.name for pattern in data for p in (REPO / "visualize").glob(pattern)}
    assert {"report.js", "report.css"} <= shipped

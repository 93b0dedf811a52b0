"""The HTML report in a real browser (headless Chromium through selenium): the diagrams
render, nothing is logged as an error, headers sort, wheel and drag change the view, the
site picker shows the chosen site graph."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_report_page import dot_node_count
from viz_models import TinyNet, example_ids, renderer_works

from surgery import IA3Pass, LoRAPass, apply_passes
from visualize import MissingRendererWarning, report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                       reason=f"needs Chromium at {CHROMIUM} and chromedriver at {CHROMEDRIVER} "
                              f"(apt-get install chromium chromium-driver; .ci/setup does it "
                              f"as root)"),
    pytest.mark.skipif(not renderer_works(), reason="no Graphviz renderer: the page has no SVG"),
    pytest.mark.slow,
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

SITE = "blocks.1.attn.v_proj"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tiny = TinyNet()
    adapted = apply_passes(tiny, [LoRAPass(pattern="blocks.*.attn.*", rank=2), IA3Pass()],
                           example_inputs=(example_ids(),))
    path = tmp_path_factory.mktemp("report") / "report.html"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        report(tiny, adapted, path, site=SITE)
    return path


@pytest.fixture(scope="module")
def browser(page: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        yield driver
    finally:
        driver.quit()


def _view_box(svg: WebElement) -> list[float]:
    return [float(v) for v in (svg.get_dom_attribute("viewBox") or "").split()]


def _column(driver: WebDriver, table: str, index: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(r => r.cells[arguments[1]].getAttribute('data-value') ?? r.cells[arguments[1]]"
        ".textContent.trim());", table, index)


def _header(driver: WebDriver, table: str, name: str) -> WebElement:
    (th,) = [h for h in driver.find_elements(By.CSS_SELECTOR, f"#{table} thead th")
             if h.text.strip().rstrip("▲▼ ") == name]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", th)
    return th


def test_diagrams_render_every_node(browser: WebDriver, page: Path) -> None:
    for key in ("before", "after"):
        svgs = browser.find_elements(By.CSS_SELECTOR, f"#panel-{key} svg")
        assert len(svgs) == 1 and svgs[0].is_displayed()
        nodes = browser.find_elements(By.CSS_SELECTOR, f"#panel-{key} svg g.node")
        dot = (page.parent / f"report.{key}.dot").read_text(encoding="utf-8")
        assert len(nodes) == dot_node_count(dot) > 0
    assert browser.find_elements(By.CSS_SELECTOR, "#panel-diff svg g.node")


def test_no_console_errors(browser: WebDriver) -> None:
    browser.refresh()
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_header_click_sorts_numerically_and_by_text(browser: WebDriver) -> None:
    before = [float(v) for v in _column(browser, "param-table", 3)]
    assert before != sorted(before)  # grouped by kind: added (16 each) before frozen (64...)
    _header(browser, "param-table", "numel").click()
    after = [float(v) for v in _column(browser, "param-table", 3)]
    assert after == sorted(before)
    _header(browser, "param-table", "numel").click()
    assert [float(v) for v in _column(browser, "param-table", 3)] == sorted(before, reverse=True)
    _header(browser, "audit-table", "module").click()
    names = _column(browser, "audit-table", 0)
    assert names == sorted(names, key=str.lower) and len(names) > 1
    _header(browser, "audit-table", "params").click()
    params = [float(v) for v in _column(browser, "audit-table", 3)]
    assert params == sorted(params) and params[-1] == 144  # the largest: mlp.0, 8*16 + 16


def test_wheel_zooms_drag_pans_reset_restores(browser: WebDriver) -> None:
    viewport = browser.find_element(By.CSS_SELECTOR, "#panel-after .viewport")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", viewport)
    svg = viewport.find_element(By.TAG_NAME, "svg")
    original = _view_box(svg)
    assert len(original) == 4 and original[2] > 0
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(viewport), 0, -200).perform()
    zoomed = _view_box(svg)
    assert zoomed[2] < original[2] and zoomed[3] < original[3]  # zoomed in: less is shown
    assert math.isclose(zoomed[2] / zoomed[3], original[2] / original[3], rel_tol=1e-3)
    ActionChains(browser).click_and_hold(viewport).move_by_offset(60, 40).release().perform()
    panned = _view_box(svg)
    assert panned[2:] == zoomed[2:]  # same size, moved against the drag
    assert panned[0] < zoomed[0] and panned[1] < zoomed[1]
    browser.find_element(By.CSS_SELECTOR, "#panel-after button[data-zoom='reset']").click()
    assert _view_box(svg) == original


def test_site_picker_shows_the_chosen_site(browser: WebDriver) -> None:
    first = browser.find_element(By.ID, "panel-site0")
    assert first.get_attribute("data-site") == SITE and first.is_displayed()
    select = browser.find_element(By.ID, "site-select")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", select)
    options = Select(select).options
    assert len(options) == 4 and options[0].text.startswith(SITE)
    Select(select).select_by_index(3)
    chosen = browser.find_element(By.ID, "panel-site3")
    assert chosen.is_displayed() and not first.is_displayed()
    assert chosen.get_attribute("data-site") == "blocks.0.mlp.2"
    svg = chosen.find_element(By.TAG_NAME, "svg")
    assert svg.is_displayed() and svg.size["width"] > 0
    assert chosen.find_elements(By.CSS_SELECTOR, "g.node")
    shown = [p.get_attribute("data-site") for p in
             browser.find_elements(By.CSS_SELECTOR, ".site-panel") if p.is_displayed()]
    assert shown == ["blocks.0.mlp.2"]


def test_screenshot(browser: WebDriver, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert os.path.getsize(shot) == len(data)

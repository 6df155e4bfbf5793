"""The rendered-page checks of ``test_rendered_book.py`` on hand-made pages: they must flag a code block wider
than the page, a cell's stderr output and warning text, and pass a clean page. Needs playwright and chromium
(skipped without them, as ``make book-check`` would fail instead)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("rendered_book", Path(__file__).with_name("test_rendered_book.py"))
rendered_book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rendered_book)

STYLE = "<style>main { width: 400px } pre { overflow: auto; font: 14px monospace; padding: 1rem }</style>"


def page_report(browser, body: str) -> dict:
    page = browser.new_page(viewport=rendered_book.VIEWPORT)
    try:
        page.set_content(f"<html><head><title>t</title>{STYLE}</head><body><main>{body}</main></body></html>")
        return page.evaluate(rendered_book.PAGE_REPORT_JS, list(rendered_book.RAW_TEX))
    finally:
        page.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        rendered_book._missing("python playwright is not installed (tools/install_book_deps.sh)")
    if not Path(rendered_book.CHROMIUM).exists():
        rendered_book._missing(f"{rendered_book.CHROMIUM} is missing (tools/install_book_deps.sh)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=rendered_book.CHROMIUM, args=rendered_book.CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


def test_clean_page_passes(browser):
    report = page_report(browser, "<div class='cell_input'><pre>x = 1</pre></div><p>Prose about a warning.</p>")
    assert report["overflow"] == [] and report["stderr"] == [] and report["warningText"] == []


def test_wide_code_stderr_and_warnings_are_flagged(browser):
    body = (
        f"<div class='cell_input'><pre>x = '{'a' * 120}'</pre></div>"
        "<div class='output stderr'><pre>100%|##########| 3/3</pre></div>"
        "<div class='output stream'><pre>/tmp/x.py:3: UserWarning: beware</pre></div>"
    )
    report = page_report(browser, body)
    assert len(report["overflow"]) == 1 and "x = 'aaa" in report["overflow"][0]
    assert report["stderr"] == ["100%|##########| 3/3"]
    assert report["warningText"] == ["/tmp/x.py:3: UserWarning: beware"]

"""The rendered book, as a reader's browser sees it: every page of ``_build/html`` in headless chromium.

On every page: math is typeset by the book's own MathJax (no raw TeX left, no TeX errors, fonts loaded),
every image loaded, a notebook page's Colab button opens that notebook from GitHub, nothing is fetched from
a host other than the local server and nothing fails to load. Screenshots of a few pages go to
``_build/screenshots/``. Skipped until ``make book`` has built ``_build/html``; ``make book-check`` runs it
(and fails instead of skipping when playwright or chromium is missing).

Uses Debian's ``/usr/bin/chromium`` through Python playwright (``tools/install_book_deps.sh``); playwright's own
browser download is never used.
"""

from __future__ import annotations

import os
import re
import threading
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
COLAB_PREFIX = "https://colab.research.google.com/github/instdisc-lite/instdisc_lite/blob/main/"
SCREENSHOT_PAGES = ("book/00_preface.html", "book/01_classes_to_instances.html", "book/05_training.html")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# From 1440 px on, the article has its full width (60em) and a code block holds 89 columns (tests/test_book_prose.py)
VIEWPORT = {"width": 1440, "height": 900}
NON_NETWORK_SCHEMES = {"data", "blob", "about", "file"}
RAW_TEX = ("$$", "\\(", "\\[")

pytestmark = pytest.mark.skipif(
    not (HTML / "index.html").exists(), reason="no rendered book in _build/html: run `make book` first"
)


def _pages() -> list[str]:
    skip = {"_static", "_sources", "_images"}
    pages = [p.relative_to(HTML) for p in HTML.rglob("*.html") if not skip & set(p.relative_to(HTML).parts)]
    return sorted(p.as_posix() for p in pages)


PAGES = _pages() if HTML.exists() else []


def _missing(reason: str):
    if os.environ.get("INSTDISC_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


def _is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in NON_NETWORK_SCHEMES or parsed.hostname in LOCAL_HOSTS


def _notebook_for(page: str) -> Path | None:
    """The notebook a page was built from, relative to the repository root, or None."""
    notebook = Path(page).with_suffix(".ipynb")
    return notebook if (ROOT / notebook).exists() else None


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(HTML)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("python playwright is not installed (tools/install_book_deps.sh)")
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} is missing (apt-get install -y chromium; tools/install_book_deps.sh)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


# Runs in the page: waits for MathJax, then reports what a reader would see.
PAGE_REPORT_JS = """
async (rawTex) => {
  const report = {mathjax: false};
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
    report.mathjax = true;
  }
  const math = [...document.querySelectorAll('.math')];
  report.math = math.length;
  report.untypeset = math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80));
  report.containers = document.querySelectorAll('mjx-container').length;
  report.texErrors = [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80));
  // raw TeX delimiters left in prose (code, outputs and typeset math are not prose)
  const prose = (document.querySelector('main') || document.body).cloneNode(true);
  prose.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight, .cell_output')
       .forEach(e => e.remove());
  const text = prose.textContent;
  report.rawTex = rawTex.filter(d => text.includes(d));
  report.brokenImages = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
                                           .map(i => i.currentSrc || i.src);
  report.images = document.images.length;
  report.colab = [...document.querySelectorAll('a[href*="colab.research.google.com"]')].map(a => a.href);
  report.errorOutputs = document.querySelectorAll('.output.traceback, .output.error').length;
  // code and output blocks wider than the page: the reader would have to scroll sideways
  // printouts wrap (book/_static/instdisc.css); code is written to fit (tests/test_book_prose.py)
  report.unwrapped = [...document.querySelectorAll('main .cell_output pre')]
      .filter(pre => getComputedStyle(pre).whiteSpace !== 'pre-wrap').length;
  // a markdown table that a cell displayed but the page left as text (pipes and dashes in a paragraph)
  report.rawTables = [...document.querySelectorAll('main .cell_output p')]
      .filter(p => /^\\s*\\|.*\\|\\s*$/m.test(p.textContent) && /\\|\\s*[-\\u2014\\u2013:]+\\s*\\|/.test(p.textContent))
      .map(p => p.textContent.trim().slice(0, 60));
  report.overflow = [...document.querySelectorAll('main pre')]
      .filter(pre => pre.scrollWidth > pre.clientWidth + 1)
      .map(pre => `${pre.scrollWidth - pre.clientWidth}px too wide: ${pre.textContent.trim().slice(0, 60)}`);
  // what a cell wrote to stderr (myst-nb: .output.stderr), Python warnings, and docutils' own warnings
  const warned = [...document.querySelectorAll('main .output.stderr, main .system-message, main .problematic')];
  const pageText = (document.querySelector('main') || document.body).innerText;
  report.stderr = warned.map(e => e.textContent.trim().slice(0, 100));
  report.warningText = (pageText.match(/^.*\\w+Warning: .*$/gm) || []).map(l => l.slice(0, 100));
  report.title = document.title;
  return report;
}
"""


@pytest.mark.parametrize("page_path", PAGES)
def test_page_renders_offline(browser, server, page_path):
    page = browser.new_page(viewport=VIEWPORT)
    requests, external, failed, errors = [], [], [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("request", lambda r: None if _is_local(r.url) else external.append(r.url))
    page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: failed.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server + page_path, wait_until="load")
        page.wait_for_load_state("networkidle")
        shown = urlparse(page.url).path.lstrip("/")  # index.html redirects to the preface
        report = page.evaluate(PAGE_REPORT_JS, list(RAW_TEX))
        page.wait_for_load_state("networkidle")  # fonts MathJax asked for while typesetting
        if page_path in SCREENSHOT_PAGES:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / (Path(page_path).stem + ".png")), full_page=True)
    finally:
        page.close()

    assert not external, f"{page_path} fetched from non-local hosts: {external}"
    assert not failed, f"{page_path}: requests failed: {failed}"
    assert not errors, f"{page_path}: JavaScript errors: {errors}"
    assert report["title"], f"{page_path}: no title"

    if report["math"] or report["rawTex"]:
        assert report["mathjax"], f"{page_path} has math but MathJax did not load"
        assert not report["untypeset"], f"{page_path}: math left untypeset: {report['untypeset']}"
        assert report["containers"] >= report["math"], f"{page_path}: fewer mjx-container than math elements"
        assert not report["texErrors"], f"{page_path}: TeX errors: {report['texErrors']}"
        fonts = [u for u in requests if "/_static/mathjax/output/chtml/fonts/woff-v2/" in u]
        assert fonts, f"{page_path}: MathJax loaded no fonts from the book's own copy"
    assert not report["rawTex"], f"{page_path}: raw TeX delimiters {report['rawTex']} left in the text"

    assert not report["brokenImages"], f"{page_path}: images that did not load: {report['brokenImages']}"
    assert not report["errorOutputs"], f"{page_path}: a cell's output is an error"
    assert not report["stderr"], f"{page_path}: stderr output or warnings on the page: {report['stderr']}"
    assert not report["warningText"], f"{page_path}: warning text on the page: {report['warningText']}"
    assert not report["rawTables"], f"{page_path}: tables shown as text: {report['rawTables']}"
    assert not report["unwrapped"], f"{page_path}: printouts that do not wrap (is book/_static/instdisc.css loaded?)"
    assert not report["overflow"], f"{page_path}: code or output blocks wider than the page: {report['overflow']}"

    notebook = _notebook_for(shown)
    if notebook is not None:
        expected = COLAB_PREFIX + notebook.as_posix()
        assert report["colab"], f"{shown}: no Colab launch button"
        assert set(report["colab"]) == {expected}, f"{shown}: Colab link {report['colab']} != {expected}"
    else:
        assert not report["colab"], f"{shown} is not a notebook but links to Colab: {report['colab']}"


class _Assets(HTMLParser):
    """Collects the URLs a page loads by itself (scripts, stylesheets, images, frames), not its links."""

    LOADING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src", "audio": "src"}
    LOADING_REL = {"stylesheet", "preload", "modulepreload", "icon", "shortcut icon", "prefetch"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.LOADING and attrs.get(self.LOADING[tag]):
            self.urls.append(attrs[self.LOADING[tag]])
        if tag == "link" and (attrs.get("rel") or "").lower() in self.LOADING_REL and attrs.get("href"):
            self.urls.append(attrs["href"])


@pytest.mark.parametrize("page_path", PAGES)
def test_page_references_no_cdn(page_path):
    """Static check of the HTML: every asset a page loads is part of the build; MathJax is the book's copy."""
    html = (HTML / page_path).read_text(encoding="utf-8")
    parser = _Assets()
    parser.feed(html)
    remote = [u for u in parser.urls if urlparse(u).scheme in ("http", "https") or u.startswith("//")]
    assert not remote, f"{page_path} loads remote assets: {remote}"
    assert not re.search(r"cdn\.jsdelivr\.net|mathjax@\d|cdnjs\.cloudflare\.com", html), f"{page_path} names a CDN"
    if re.search(r'class="math notranslate', html):
        assert re.search(r'src="[^"]*_static/mathjax/tex-chtml\.js', html), f"{page_path}: not the local MathJax"

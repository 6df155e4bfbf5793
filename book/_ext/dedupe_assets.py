"""Sphinx extension for the book: write each <script>/<link> asset into a page only once.

Under Jupyter Book 1, extensions that add their inline scripts from an ``env-before-read-docs`` handler
(sphinx-thebe, sphinx-togglebutton) end up in every page twice. sphinx-thebe's script declares
``const THEBE_JS_URL``, so the second copy throws a SyntaxError on every page. Dropping exact duplicates
(same file or body, same attributes) just before a page is rendered removes the error and nothing else.
"""

from __future__ import annotations


def _key(asset) -> tuple:
    # the two copies differ only in how "no file" is spelled (None in one, "" in the other)
    filename = getattr(asset, "filename", asset) or ""
    attributes = getattr(asset, "attributes", {}) or {}
    return str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def _dedupe(app, pagename, templatename, context, doctree) -> None:
    for name in ("script_files", "css_files"):
        assets = context.get(name)
        if not assets:
            continue
        seen: set[tuple] = set()
        unique = []
        for asset in assets:
            key = _key(asset)
            if key not in seen:
                seen.add(key)
                unique.append(asset)
        assets[:] = unique


def setup(app):
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _dedupe, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

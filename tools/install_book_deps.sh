#!/usr/bin/env bash
# What building and checking the book needs beyond `pip install -e ".[dev,book]"`:
#   - MathJax 3 from npm, served from the book (tools/install_mathjax.sh)      -> make mathjax
#   - Debian's chromium and Python playwright, for the rendered-book test       -> make book-check
# Playwright drives /usr/bin/chromium; `playwright install` (a browser download) is never run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""
[[ "$(id -u)" == "0" ]] || SUDO="sudo"

if ! command -v chromium > /dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium
fi
if ! command -v npm > /dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nodejs npm
fi
"$PYTHON" -m pip install -q playwright
tools/install_mathjax.sh

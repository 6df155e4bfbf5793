#!/usr/bin/env bash
# Serve MathJax 3 from the book itself, so rendered pages typeset math with no network.
# Installs the npm package `mathjax` into a git-ignored prefix (_build/npm) and copies the files the
# page needs (the tex-chtml bundle, its CHTML woff-v2 fonts, and the components it may load on demand:
# TeX extensions, the menu, the accessibility tools) into the git-ignored book/_static/mathjax/, which
# _config.yml serves as `mathjax_path: mathjax/tex-chtml.js` under html_static_path.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${MATHJAX_VERSION:-3.2.2}"
PREFIX="_build/npm"
DEST="book/_static/mathjax"

if [[ -f "$DEST/tex-chtml.js" && -f "$DEST/.version" && "$(cat "$DEST/.version")" == "$VERSION" ]]; then
  echo "MathJax $VERSION already in $DEST"
  exit 0
fi

mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --loglevel=error "mathjax@$VERSION"
SRC="$PREFIX/node_modules/mathjax/es5"

rm -rf "$DEST"
mkdir -p "$DEST/output"
cp "$SRC/tex-chtml.js" "$DEST/"
cp -r "$SRC/output/chtml" "$DEST/output/"   # includes fonts/woff-v2, the fonts CHTML output loads
cp -r "$SRC/input" "$SRC/ui" "$SRC/a11y" "$SRC/sre" "$DEST/"
cp "$PREFIX/node_modules/mathjax/LICENSE" "$DEST/"
echo "$VERSION" > "$DEST/.version"
test -s "$DEST/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff"
echo "MathJax $VERSION copied to $DEST ($(du -sh "$DEST" | cut -f1))"

#!/usr/bin/env bash
# Regenerate every generated documentation page from its source, then build the site into site/ (strict: a broken
# link, a missing anchor or a page outside the nav fails). On a clean checkout this changes no tracked file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" scripts/render_reference.py   # docs/reference/{config,cli}.md, docs/design/internals.md: from the code
"$PYTHON" scripts/render_results.py     # docs/results/: from bench/results/
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict --quiet
echo "docs.sh: generated pages rendered, site/ built"

#!/usr/bin/env bash
# Builds the source distribution into dist/ (no compiler, no torch needed).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python}
"$python" -m pip install --disable-pip-version-check --quiet build "scikit-build-core>=0.10"
"$python" -m build --sdist --no-isolation --outdir "$root/dist" "$root"

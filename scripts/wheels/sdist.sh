#!/usr/bin/env bash
# Builds the source distribution (no compiler, no torch needed: --skip-dependency-check, since the
# build requirements name torch, which only building the wheel from it needs).
# Usage: sdist.sh [OUTDIR]   (default: dist/ of the repository)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
outdir=${1:-$root/dist}
python=${PYTHON:-python}
"$python" -m pip install --disable-pip-version-check --quiet build "scikit-build-core>=0.10"
"$python" -m build --sdist --no-isolation --skip-dependency-check --outdir "$outdir" "$root"

#!/usr/bin/env bash
# Builds the source distribution (no compiler, no torch needed: --skip-dependency-check, since the
# build requirements name torch, which only building the wheel from it needs). It is built from a copy
# of the files git knows (as build.sh does): the tree may hold gigabytes of ignored virtual
# environments under .work/, which the sdist builder would otherwise walk.
# Usage: sdist.sh [OUTDIR]   (default: dist/ of the repository)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
outdir=${1:-$root/dist}
python=${PYTHON:-python}
"$python" -m pip install --disable-pip-version-check --quiet build "scikit-build-core>=0.10"
source_copy=$(mktemp -d)
trap 'rm -rf "$source_copy"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$source_copy")
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
"$python" -m build --sdist --no-isolation --skip-dependency-check --outdir "$outdir" "$source_copy"

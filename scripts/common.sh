# shellcheck shell=bash
# Shared by the scripts in this folder: where virtual environments and wheels go, and how they are made.
# Everything lands under $WORK (default: .work/ in the repository), which git ignores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export WORK=${INPLACE_ABN_WORK:-$ROOT/.work}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

log() { printf '\n== %s\n' "$*" >&2; }

# pip, without this machine's notes about configured package locations that do not exist.
pip_in() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# make_venv DIR PACKAGES...: a fresh virtual environment with the given packages.
make_venv() {
  local dir=$1
  shift
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  pip_in "$dir" install --quiet "$@"
}

# ensure_cuobjdump: puts cuobjdump on PATH: the toolkit's, else NVIDIA's PyPI package (any 13.x reads
# CUDA 13.0 code).
ensure_cuobjdump() {
  if command -v cuobjdump > /dev/null; then return; fi
  if [ -x /usr/local/cuda/bin/cuobjdump ]; then PATH=/usr/local/cuda/bin:$PATH; return; fi
  local tools=$WORK/cuda-tools
  if [ -z "$(find "$tools" -name cuobjdump -type f 2> /dev/null | head -n 1)" ]; then
    make_venv "$tools" --no-deps nvidia-cuda-cuobjdump
  fi
  PATH=$(dirname "$(find "$tools" -name cuobjdump -type f | head -n 1)"):$PATH
  export PATH
}

# build_wheel [cpu|cuda]: builds the wheel with scripts/wheels/build.sh, the steps the release workflow
# runs; prints its path. $INPLACE_ABN_WHEEL, when set, names a wheel built before: it is used instead
# (CI builds one wheel and tests it everywhere).
build_wheel() {
  if [ -n "${INPLACE_ABN_WHEEL:-}" ]; then
    [ -f "$INPLACE_ABN_WHEEL" ] || { echo "INPLACE_ABN_WHEEL=$INPLACE_ABN_WHEEL: no such file" >&2; return 1; }
    log "using the wheel built before: $INPLACE_ABN_WHEEL"
    echo "$INPLACE_ABN_WHEEL"
    return
  fi
  if [ "${1:-cpu}" = cuda ]; then ensure_cuobjdump; fi
  bash "$ROOT/scripts/wheels/build.sh" "${1:-cpu}"
}

# install_env DIR WHEEL EXTRA_PACKAGES...: a fresh environment with torch and the wheel installed.
install_env() {
  local dir=$1 wheel=$2
  shift 2
  log "fresh environment $dir: torch $TORCH_VERSION + $(basename "$wheel") $*"
  make_venv "$dir" "torch==$TORCH_VERSION" "$@"
  pip_in "$dir" install --quiet --no-deps "$wheel"
}

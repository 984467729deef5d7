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

# build_wheel [VARIANT]: builds the wheel variant (default cpu) with scripts/wheels/build.sh, the
# steps the release workflow runs; prints its path.
build_wheel() {
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

#!/usr/bin/env bash
# Builds the wheel CI tests everywhere, once: the CPU library and the CUDA 13 library
# (scripts/wheels/build.sh cuda: nvcc 13.0 against torch 2.14.1, a CUDA 13.0 build), repaired and
# checked by check.sh (cuobjdump: real code for every configured architecture and PTX for the newest;
# no torch or CUDA runtime bundled); then checks that the CUDA library links the CUDA runtime
# statically and that every kernel stays within its register / spill / shared-memory budget
# (scripts/cuda_resources.py, src/cuda/resource_budgets.json). Prints the wheel's path. (CUDA 12 nvcc is not installable here: the release workflow
# builds the CUDA 12 library.) About 7 minutes on 2 cores, most of it nvcc.
# Usage: wheel=$(bash scripts/ci_cuda.sh)
#   INPLACE_ABN_CUDA_ARCHS (default 75;80;86;89;90;100;120): the architectures to build and check
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
if [ -n "${INPLACE_ABN_CUDA_ARCHS:-}" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DINPLACE_ABN_CUDA_ARCHS=$INPLACE_ABN_CUDA_ARCHS"
fi
started=$SECONDS
unset INPLACE_ABN_WHEEL
wheel=$(build_wheel cuda)
log "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $((SECONDS - started)) s"

unpacked=$WORK/unpacked-ci-wheel
rm -rf "$unpacked" && mkdir -p "$unpacked"
"$PYTHON" -m zipfile -e "$wheel" "$unpacked"
ensure_cuobjdump  # build_wheel ran in a subshell: its PATH is not ours
ls -l "$unpacked/inplace_abn/"*.so "$unpacked/inplace_abn/build_info.json" >&2
for library in "$unpacked"/inplace_abn/inplace_abn_cuda*.so; do
  if readelf -d "$library" | grep -q 'NEEDED.*cudart'; then
    echo "ci_cuda.sh: $(basename "$library") needs a shared CUDA runtime: it must link it statically" >&2
    exit 1
  fi
  log "$(basename "$library"): kernel registers, spills and shared memory (sm_80, sm_90) against src/cuda/resource_budgets.json"
  "$PYTHON" "$ROOT/scripts/cuda_resources.py" "$library" >&2
done
echo "$wheel"

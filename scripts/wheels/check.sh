#!/usr/bin/env bash
# Checks a repaired wheel: check-wheel-contents, what is inside (inspect_wheel.py: no torch or CUDA
# runtime library, the CPU library and the CUDA library of each expected major with the GPU
# architectures its build_info.json lists, checked with cuobjdump), and auditwheel's view on Linux.
# Usage: check.sh WHEEL [CUDA_MAJORS]   e.g. check.sh dist/torch_inplace_abn-*.whl "12 13"
#   (default: $INPLACE_ABN_CUDA_MAJORS; empty: a CPU-only wheel)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
wheel=${1:?usage: check.sh WHEEL [CUDA_MAJORS]}
majors=${2-${INPLACE_ABN_CUDA_MAJORS:-}}
python=${PYTHON:-python}
"$python" -m check_wheel_contents "$wheel"
"$python" "$here/inspect_wheel.py" "$wheel" --cuda "$majors"
if [ "$(uname -s)" = Linux ]; then
  "$python" -m auditwheel show "$wheel"
fi

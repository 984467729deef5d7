#!/usr/bin/env bash
# Checks a repaired wheel: check-wheel-contents, what is inside (inspect_wheel.py: no torch or CUDA
# runtime library, the variant's native libraries and architectures), and auditwheel's view on Linux.
# Usage: check.sh WHEEL [VARIANT]   (default: $INPLACE_ABN_VARIANT; INPLACE_ABN_LOCAL_VERSION=0 for PyPI's wheel)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
wheel=${1:?usage: check.sh WHEEL VARIANT}
variant=${2:-${INPLACE_ABN_VARIANT:?usage: check.sh WHEEL [VARIANT], or set INPLACE_ABN_VARIANT}}
python=${PYTHON:-python}
"$python" -m check_wheel_contents "$wheel"
"$python" "$here/inspect_wheel.py" "$wheel" --variant "$variant" --local "${INPLACE_ABN_LOCAL_VERSION:-1}"
if [ "$(uname -s)" = Linux ]; then
  "$python" -m auditwheel show "$wheel"
fi

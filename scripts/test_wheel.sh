#!/usr/bin/env bash
# Installs a built wheel into a fresh virtual environment with the given torch and runs the tests
# against it (never against the source tree); then the kernel tests again with the portable baseline CPU kernels.
# Usage: test_wheel.sh WHEEL TORCH_VERSION [EXTRA_PACKAGES...] [-- PYTEST_ARGS...]
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=${1:?usage: test_wheel.sh WHEEL TORCH_VERSION [PACKAGES...] [-- PYTEST_ARGS...]}
TORCH_VERSION=${2:?usage: test_wheel.sh WHEEL TORCH_VERSION [PACKAGES...] [-- PYTEST_ARGS...]}
shift 2
packages=(numpy pytest)
while [ $# -gt 0 ] && [ "$1" != -- ]; do packages+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
venv=$WORK/test-venv-torch-$TORCH_VERSION
install_env "$venv" "$wheel" "${packages[@]}"
cd "$ROOT" || exit 1
isa=$("$venv/bin/python" -c 'import torch, inplace_abn; print(torch.ops.inplace_abn.cpu_isa())')
log "tests: $(basename "$wheel") with torch $TORCH_VERSION (CPU kernels: $isa)"
"$venv/bin/python" -m pytest tests "$@"
# The tests of the CPU kernels themselves; the rest (compile, distributed, export, ...) call the same
# operators and ran above.
log "kernel tests with the portable baseline CPU kernels (INPLACE_ABN_CPU_ISA=baseline)"
INPLACE_ABN_CPU_ISA=baseline "$venv/bin/python" -m pytest tests/test_correctness.py tests/test_ops.py tests/test_cpu_kernels.py \
  tests/test_errors.py tests/test_memory.py tests/test_api.py -q "$@"

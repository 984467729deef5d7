#!/usr/bin/env bash
# Installs a built wheel into a fresh virtual environment with the given torch, checks which native
# libraries the loader chose there (scripts/wheels/check_loader.py) and runs the tests against the
# installed package (never against the source tree); then the kernel tests again with each lower CPU
# kernel build (avx2 where the processor has AVX-512, and the portable baseline).
# Usage: test_wheel.sh WHEEL TORCH_VERSION [EXTRA_PACKAGES...] [-- PYTEST_ARGS...]
#   PYTHON        the interpreter of the venv (default python3; CI uses pyenv's 3.10 and 3.13 too)
#   CHECK_LOADER  what the loader must load, ";"-separated check_loader.py arguments (default: cpu for a
#                 CPU-only torch, else cuda<torch's CUDA major>); "none" skips the check
#   TEST_FILES    the test files to run (default: tests, then the lower-kernel passes); when set, only
#                 those, once
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=${1:?usage: test_wheel.sh WHEEL TORCH_VERSION [PACKAGES...] [-- PYTEST_ARGS...]}
TORCH_VERSION=${2:?usage: test_wheel.sh WHEEL TORCH_VERSION [PACKAGES...] [-- PYTEST_ARGS...]}
shift 2
packages=(numpy pytest)
while [ $# -gt 0 ] && [ "$1" != -- ]; do packages+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=$WORK/test-venv-torch-$TORCH_VERSION-py$python_version
install_env "$venv" "$wheel" "${packages[@]}"
cd "$ROOT" || exit 1

torch_cuda=$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")')
checks=${CHECK_LOADER:-$([ -n "$torch_cuda" ] && echo "cuda${torch_cuda%%.*}" || echo cpu)}
if [ "$checks" != none ]; then
  log "loader: which native libraries load under torch $TORCH_VERSION (CUDA ${torch_cuda:-none})"
  IFS=';' read -ra check_list <<< "$checks"
  for check in "${check_list[@]}"; do
    # shellcheck disable=SC2086  # one check's arguments, e.g. "cuda12 --stand-in 13"
    (cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/wheels/check_loader.py" $check)
  done
fi

isa=$("$venv/bin/python" -c 'import torch, inplace_abn; print(torch.ops.inplace_abn.cpu_isa())')
if [ -n "${TEST_FILES:-}" ]; then
  log "tests: $(basename "$wheel") with torch $TORCH_VERSION, Python $python_version (CPU kernels: $isa): $TEST_FILES"
  # shellcheck disable=SC2086  # a list of files
  "$venv/bin/python" -m pytest $TEST_FILES "$@"
  exit
fi
log "tests: $(basename "$wheel") with torch $TORCH_VERSION, Python $python_version (CPU kernels: $isa)"
"$venv/bin/python" -m pytest tests "$@"
# The tests of the CPU kernels themselves again with each lower instruction-set build this processor
# supports (INPLACE_ABN_CPU_ISA caps the choice); the rest (compile, distributed, export, ...) call the
# same operators and ran above, as did the cross-build comparison (it runs every build itself).
lower_isas=(baseline)
[ "$isa" != avx512 ] || lower_isas=(avx2 baseline)
for lower in "${lower_isas[@]}"; do
  log "kernel tests with the $lower CPU kernels (INPLACE_ABN_CPU_ISA=$lower)"
  INPLACE_ABN_CPU_ISA=$lower "$venv/bin/python" -m pytest tests/test_correctness.py tests/test_ops.py \
    tests/test_cpu_kernels.py tests/test_adversarial.py tests/test_errors.py tests/test_memory.py tests/test_api.py -q \
    --deselect tests/test_cpu_kernels.py::test_every_instruction_set_gives_the_same_bits "$@"
done

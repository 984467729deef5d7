#!/usr/bin/env bash
# The tests: builds the wheel (scripts/wheels/build.sh cpu, the release workflow's steps, CPU library
# only), installs it in a fresh virtual environment with torch 2.13.0 and runs the tests against it,
# with the best CPU kernels for this processor, then its kernel tests with each lower build (avx2, baseline).
# INPLACE_ABN_WHEEL=PATH tests that wheel instead of building one (CI builds its wheel once).
# Usage: bash scripts/test.sh [pytest arguments]
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=$(build_wheel cpu)
bash "$ROOT/scripts/test_wheel.sh" "$wheel" "$TORCH_VERSION" -- "$@"

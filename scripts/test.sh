#!/usr/bin/env bash
# The tests: builds the CPU wheel (scripts/wheels/build.sh, the release workflow's steps), installs
# it in a fresh virtual environment with torch 2.13.0 and runs the tests against it, once with the
# best CPU kernels for this processor and once with the portable baseline build.
# Usage: bash scripts/test.sh [pytest arguments]
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=$(build_wheel cpu)
bash "$ROOT/scripts/test_wheel.sh" "$wheel" "$TORCH_VERSION" -- "$@"

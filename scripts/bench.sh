#!/usr/bin/env bash
# The main job: builds the wheel, installs it in a fresh virtual environment, and runs
# `python -m inplace_abn bench` (U-Net with BatchNorm2d + LeakyReLU vs InPlaceABN: memory, time).
# Usage: bash scripts/bench.sh [bench options, e.g. --json out.json --plot out.png]
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=$(build_wheel cpu)
install_env "$WORK/bench-venv" "$wheel" numpy matplotlib
log "python -m inplace_abn bench $*"
"$WORK/bench-venv/bin/python" -m inplace_abn bench "$@"

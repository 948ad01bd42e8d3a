#!/usr/bin/env bash
# Install what is missing, then run the checks and the whole test suite.
#
#   deploy/test.sh [pytest args]      (default: the whole suite, -q -ra)
#
# Runs `ruff check`, `mypy` (strict) and `lint-imports` (the layering contracts of ARCHITECTURE.md),
# all configured in pyproject.toml, first and stops on errors unless COE_TEST_NO_LINT=1. Tests run
# with HF_HUB_OFFLINE=1. COE_SETUP_SKIP=1 uses your own environment (python3 on PATH) instead of .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[test] %s\n' "$*"; }

deploy/setup.sh

if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
elif [[ "${COE_SETUP_SKIP:-0}" == "1" ]]; then
    PY="$(command -v python3)" || { log "ERROR: no python3 on PATH"; exit 1; }
else
    log "ERROR: .venv/bin/python not found (run deploy/setup.sh)"
    exit 1
fi

export HF_HUB_OFFLINE=1

if [[ "${COE_TEST_NO_LINT:-0}" != "1" ]]; then
    lint_failed=0
    log "ruff check"
    "$PY" -m ruff check . || lint_failed=1
    log "mypy (strict)"
    "$PY" -m mypy || lint_failed=1
    # lint-imports has no `python -m` entry; its console script's function, run by "$PY", also works
    # when COE_SETUP_SKIP=1 leaves no .venv/bin/lint-imports.
    log "lint-imports (layering contracts, ARCHITECTURE.md)"
    "$PY" -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' \
        --no-logo || lint_failed=1
    if [[ "$lint_failed" == "1" ]]; then
        log "FAILED: ruff/mypy/lint-imports reported errors (COE_TEST_NO_LINT=1 skips these checks)"
        exit 1
    fi
fi

(($# > 0)) || set -- -q -ra
log "pytest $*"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
case "$rc" in
    0) log "all tests passed" ;;
    5) log "FAILED: pytest collected no tests (exit code 5)" ;;
    *) log "FAILED: pytest exit code $rc" ;;
esac
exit "$rc"

#!/usr/bin/env bash
# Set up a fresh machine and run the tests: lint, then every cell of the version matrix (noxfile.py).
# With arguments, runs just pytest in .venv with them instead (e.g. `bash scripts/test.sh tests/test_lm.py`).
# In CI (CI set) a skipped test fails the run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ruff check roma_otel tests benchmarks noxfile.py
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q -rs "$@"
fi
# CPython 3.13 for the latest-3.13 cell: Debian's packages, unpacked into .py313 (no system change).
ROMA_OTEL_PY313="$(bash scripts/python313.sh | tail -n 1)"
export ROMA_OTEL_PY313
log="${TMPDIR:-/tmp}/roma-otel-matrix.log"
set +e
nox --no-color 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
grep -E "^nox > (Session|Ran)|^[0-9]+ (passed|failed)|^=+ .* in [0-9.]+s" "$log" | grep -vE "^nox > Session .* was successful in" || true
if [ -n "${CI:-}" ] && grep -qE "[0-9]+ skipped" "$log"; then
  echo "CI: tests were skipped; failing the run" >&2
  grep -E "^SKIPPED" "$log" >&2 || true
  exit 1
fi
exit "$status"

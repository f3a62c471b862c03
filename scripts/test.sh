#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite: lint, then pytest (nothing may be skipped in CI).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
ruff check roma_otel tests benchmarks
if [ -n "${CI:-}" ]; then
  # In CI a skipped test is a failure: every server and package the tests need is installed above.
  python -m pytest -q -rs "$@" | tee "${TMPDIR:-/tmp}/roma-otel-pytest.log"
  status=${PIPESTATUS[0]}
  if grep -qE "[0-9]+ skipped" "${TMPDIR:-/tmp}/roma-otel-pytest.log"; then
    echo "CI: tests were skipped; failing the run" >&2
    exit 1
  fi
  exit "$status"
fi
exec python -m pytest -q -rs "$@"

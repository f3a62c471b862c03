#!/usr/bin/env bash
# Set up a fresh machine and run the demo: a ROMA-style agent, offline, with its spans, costs and metrics.
# Extra arguments go to `roma-otel demo` (e.g. --keep-serving to leave the Prometheus endpoint up).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec roma-otel demo "$@"

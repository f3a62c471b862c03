#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install roma-otel with everything the demo and the
# tests need. Idempotent; sourced by demo.sh and test.sh. Set ROMA_OTEL_VENV to use another path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROMA_OTEL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# The Postgres tests start a throwaway PostgreSQL cluster: install the server if it is missing.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing PostgreSQL server binaries (apt-get install postgresql)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: PostgreSQL server binaries not found and no apt-get to install them" >&2
  fi
fi
# The Prometheus tests run promtool and start a throwaway Prometheus server: install Debian's package
# (/usr/bin/prometheus and /usr/bin/promtool) if promtool is missing. The package's own service is not used.
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Prometheus and promtool (apt-get install prometheus)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: promtool not found and no apt-get to install it" >&2
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
# litellm must never fetch its price map from the internet: use the copy bundled in the package.
export LITELLM_LOCAL_MODEL_COST_MAP=True
export PATH="$VENV/bin:$PATH"

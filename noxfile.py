"""The compatibility matrix: one nox session ("cell") per set of dependency versions roma-otel supports.

Every cell installs roma-otel with its ``dev`` extra into a fresh virtualenv (made by uv) under one
constraints file, then runs pytest there:

- ``floor``: every runtime dependency at the minimum pyproject declares (derived from pyproject, so a
  floor that is declared is a floor that is tested);
- ``roma-lock``: ROMA's locked versions (``matrix/roma-lock.txt``);
- ``dspy-3.1``, ``dspy-3.2``, ``dspy-3.3``: the newest patch of that DSPy minor, everything else newest;
- ``latest``: the newest release of everything, on CPython 3.11 and on CPython 3.13 (``latest-3.13``,
  from Debian's packages: ``ROMA_OTEL_PY313=$(bash scripts/python313.sh) nox -s latest-3.13``).

``latest`` and ``latest-3.13`` run the whole suite; the other cells run ``CORE_TESTS``. Every cell also
runs the cross-version contract test (``tests/test_contract.py``), which compares what one small
instrumented program produces with ``tests/contract/expected.json`` and names the cell in its failure.

    nox -l                      # the cells
    nox -s roma-lock            # one cell
    nox                         # all of them (what CI runs)
    nox -s floor -- -k lm       # extra arguments go to pytest
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
# What `nox` (and CI) runs: every cell, the ones with the oldest versions first, so a regression for
# ROMA's users fails fast.
nox.options.sessions = ["roma-lock", "floor", "dspy-3.1", "dspy-3.2", "dspy-3.3", "latest", "latest-3.13"]

# Instrumentation, LM, tool, propagation, Prometheus, demo, MLflow and OTLP-receiver tests, and the contract:
# what every cell runs.
CORE_TESTS = [
    "tests/test_contract.py",
    "tests/test_compat.py",
    "tests/test_compat_mlflow.py",
    "tests/test_instrumentor.py",
    "tests/test_instruments.py",
    "tests/test_lm.py",
    "tests/test_cost.py",
    "tests/test_span_attributes.py",
    "tests/test_tools.py",
    "tests/test_propagation.py",
    "tests/test_roma.py",
    "tests/test_roma_import_hook.py",
    "tests/test_standin.py",
    "tests/test_zero_code.py",
    "tests/test_prometheus.py",
    "tests/test_prometheus_e2e.py",
    "tests/test_demo_agent.py",
    "tests/test_demo_cli.py",
    "tests/test_mlflow.py",
    "tests/test_mlflow_traces.py",
    "tests/test_genai_latest.py",
    "tests/test_content.py",
    # The OTLP receiver: protobuf 6 and 7, and the 1.38 SDK exporter's retries (503, never 429).
    "tests/test_otlp_decode.py",
    "tests/test_otlp_receiver.py",
    "tests/test_dag_merge.py",
]

# What the SDK's private fast paths touch (compat.otel): run again with ROMA_OTEL_SDK_FAST_PATHS=0 on the
# SDK floor and the newest SDK, so the public-API fallback is proven to give the same spans and rows.
FAST_PATH_TESTS = [
    "tests/test_contract.py",
    "tests/test_compat.py",
    "tests/test_span_attributes.py",
    "tests/test_lm.py",
    "tests/test_tools.py",
    "tests/test_postgres_writer.py",
    "tests/test_postgres_process.py",
]

# Runtime extras whose minimums the floor cell pins (dev's test tools stay newest; its `mlflow`, the
# tracking server the MLflow tests start, is a runtime peer and is pinned too).
_FLOOR_EXTRAS = ("instruments", "demo", "postgres", "api", "mlflow")
_FLOOR_DEV = ("mlflow",)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def floor_constraints() -> list[str]:
    """``name==minimum`` for every runtime dependency pyproject declares with ``>=``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    extras = project["optional-dependencies"]
    for extra in _FLOOR_EXTRAS:
        requirements += extras[extra]
    requirements += [r for r in extras["dev"] if _name(r) in _FLOOR_DEV]
    pins: dict[str, str] = {}
    for requirement in requirements:
        found = re.search(r">=\s*([^,;\s\]]+)", requirement)
        if found is None or requirement.startswith("roma-otel"):
            continue
        pins[_name(requirement)] = found.group(1)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _constraints_file(session: nox.Session, lines: list[str]) -> str:
    path = Path(session.create_tmp()) / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run_cell(session: nox.Session, constraints: list[str], tests: list[str] | None, fallback: bool = False) -> None:
    args = ["-e", f"{ROOT}[dev]"]
    if constraints:
        args += ["-c", _constraints_file(session, constraints)]
    session.install(*args)
    session.run(
        "python", "-c",
        "import importlib.metadata as m, sys; print(sys.version.split()[0], *(f'{p}=={m.version(p)}' for p in "
        "('dspy', 'litellm', 'opentelemetry-sdk', 'opentelemetry-exporter-prometheus', 'mlflow')))",
    )  # fmt: skip
    env = {"ROMA_OTEL_CELL": session.name, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    pytest = ("python", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider")
    session.run(*pytest, *(tests or []), *session.posargs, env=env)
    if fallback and not session.posargs:
        session.run(*pytest, *FAST_PATH_TESTS, env={**env, "ROMA_OTEL_SDK_FAST_PATHS": "0"})


# CPython 3.13 is not a system Python here: scripts/python313.sh unpacks Debian's and prints its path,
# and scripts/test.sh passes it in. Without ROMA_OTEL_PY313, nox looks for python3.13 on PATH.
PY313 = os.environ.get("ROMA_OTEL_PY313") or "3.13"


@nox.session(python="3.11")
def latest(session: nox.Session) -> None:
    """The newest release of everything, on CPython 3.11: the whole suite, and the SDK fallback."""
    _run_cell(session, [], None, fallback=True)


@nox.session(name="latest-3.13", python=PY313)
def latest_313(session: nox.Session) -> None:
    """The newest release of everything, on CPython 3.13 (ROMA needs >= 3.12): the whole suite."""
    _run_cell(session, [], None)


@nox.session(python="3.11")
def floor(session: nox.Session) -> None:
    """Every runtime dependency at its declared minimum, and the SDK fallback."""
    _run_cell(session, floor_constraints(), CORE_TESTS, fallback=True)


@nox.session(name="roma-lock", python="3.11")
def roma_lock(session: nox.Session) -> None:
    """ROMA's locked versions (matrix/roma-lock.txt)."""
    lines = [ln for ln in (ROOT / "matrix" / "roma-lock.txt").read_text().splitlines() if ln and ln[0] != "#"]
    _run_cell(session, lines, CORE_TESTS)


def _dspy_cell(minor: str) -> None:
    @nox.session(name=f"dspy-{minor}", python="3.11")
    def cell(session: nox.Session) -> None:
        _run_cell(session, [f"dspy=={minor}.*"], CORE_TESTS)

    cell.__doc__ = f"The newest DSPy {minor}.x, everything else newest."


for _minor in ("3.1", "3.2", "3.3"):
    _dspy_cell(_minor)

"""The zero-code path: ``opentelemetry-instrument python app.py`` on an unmodified DSPy app.

The app (tests/apps/zero_code_app.py) imports nothing from roma-otel. The SDK is configured purely from
OTEL_* variables by opentelemetry-distro; roma-otel is found through its ``opentelemetry_instrumentor``
entry point. Spans go to the console exporter (JSON on stdout) and metrics to the SDK's own Prometheus
endpoint, which must carry the same contract series as roma-otel's in-process endpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roma_otel import RomaInstrumentor
from roma_otel import semconv as sc
from roma_otel.config import default_config
from roma_otel.package import _instruments
from tests.conftest import roma_samples, scope_labelled

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "zero_code_app.py"
ANSWER = "Rome is the capital of Italy."
LM_SPAN = "chat gpt-4o-mini"
TOOL_SPAN = f"{sc.SPAN_TOOL_PREFIX} lookup_city"

# What the app exercises: no failing tool, no task scopes, no toolkit lifecycle.
NOT_EXERCISED = {
    "tool_invocations_failed_total",
    "tasks_total",
    "toolkit_lifecycle_events_total",
    "toolkit_lifecycle_duration_ms_bucket",
}
EXERCISED = [n for n in sc.PROMETHEUS_SERIES if n not in NOT_EXERCISED]


def _opentelemetry_instrument() -> str:
    candidate = Path(sys.executable).parent / "opentelemetry-instrument"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("opentelemetry-instrument")
    if found is None:
        pytest.skip("opentelemetry-instrument is not installed")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AppRun:
    returncode: int
    stdout: str
    stderr: str
    scrape: str

    def spans(self) -> list[dict[str, Any]]:
        """The console exporter's JSON objects, one per span, concatenated on stdout."""
        decoder = json.JSONDecoder()
        out: list[dict[str, Any]] = []
        text = self.stdout
        i = 0
        while True:
            start = text.find("{", i)
            if start < 0:
                return out
            try:
                obj, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                i = start + 1
                continue
            if isinstance(obj, dict) and "name" in obj and "context" in obj:
                out.append(obj)
            i = end

    def samples(self) -> list[Any]:
        return [s for f in text_string_to_metric_families(self.scrape) for s in f.samples]


class _Launched:
    """One app process started under opentelemetry-instrument; ``finish()`` scrapes it and lets it exit."""

    def __init__(self, tmp: Path, name: str, extra_env: dict[str, str]) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.ready = tmp / f"{name}.ready"
        self.done = tmp / f"{name}.done"
        self.out_path = tmp / f"{name}.stdout"
        self.err_path = tmp / f"{name}.stderr"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "ROMA_OTEL_", "TOOLKIT_", "MLFLOW_")) and k != "DATABASE_URL"
        }
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "OTEL_METRICS_EXPORTER": "prometheus",
                "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
                "OTEL_EXPORTER_PROMETHEUS_PORT": str(self.port),
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_LOGS_EXPORTER": "none",
                "OTEL_SERVICE_NAME": "zc",
                "ZC_READY_FILE": str(self.ready),
                "ZC_DONE_FILE": str(self.done),
                "ZC_WAIT_SECONDS": "60",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra_env)
        self._out = self.out_path.open("w")
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [_opentelemetry_instrument(), sys.executable, str(APP)],
            cwd=str(tmp),
            env=env,
            stdout=self._out,
            stderr=self._err,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited early ({self.proc.returncode}):\n{self.err_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"app not ready in {timeout}s:\n{self.err_path.read_text()[-4000:]}")
            time.sleep(0.05)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode("utf-8")

    def release(self) -> None:
        self.done.write_text("done")

    def result(self, scrape: str, timeout: float = 30.0) -> AppRun:
        try:
            returncode = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        return AppRun(returncode, self.out_path.read_text(), self.err_path.read_text(), scrape)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AppRun]]:
    """Both runs, started together to save wall time: roma-otel enabled, and disabled by env."""
    tmp = tmp_path_factory.mktemp("zero_code")
    # openinference-instrumentation-dspy (a dev dependency) registers the entry point "dspy" too; it is
    # disabled in the "enabled" run so this file checks roma-otel alone (coexistence is tested in
    # test_instrumentor.py, where the load order can be fixed).
    launched = {
        "enabled": _Launched(tmp, "enabled", {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "dspy"}),
        "disabled": _Launched(tmp, "disabled", {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "roma_otel"}),
    }
    try:
        scrapes = {}
        for name, app in launched.items():
            app.wait_ready()
            scrapes[name] = app.scrape()
        for app in launched.values():
            app.release()
        results = {name: app.result(scrapes[name]) for name, app in launched.items()}
    finally:
        for app in launched.values():
            app.close()
    yield results


def _roma_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in spans if any(k.startswith("roma.") for k in s.get("attributes", {}))]


def _own(labels: dict[str, str]) -> frozenset[str]:
    return frozenset(k for k in labels if not k.startswith("otel_scope_"))


# --- roma-otel enabled ---------------------------------------------------------------------------------
def test_zero_code_console_spans_carry_roma_attributes(runs: dict[str, AppRun]) -> None:
    run = runs["enabled"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"answer: {ANSWER}" in run.stderr
    spans = run.spans()
    assert spans, f"no console spans on stdout:\n{run.stdout[:2000]}"
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)

    # Module spans, named after the module class, with the role label.
    for name, role in (("TravelAgent", "TravelAgent"), ("Planner", "planner"), ("Executor", "executor")):
        assert name in by_name, f"no {name!r} span; have {sorted(by_name)}"
        module_spans = [s for s in by_name[name] if sc.MODULE in s["attributes"]]
        assert len(module_spans) == 1, name
        attrs = module_spans[0]["attributes"]
        assert attrs[sc.MODULE] == role
        assert attrs[sc.MODULE_CLASS].endswith(name)
        assert attrs[sc.EXECUTION_ID]
    root = next(s for s in by_name["TravelAgent"] if sc.MODULE in s["attributes"])
    assert root["attributes"][sc.EXECUTION_IMPLICIT] is True
    assert root["attributes"][sc.EXECUTION_STATUS] == "completed"

    # LM spans: GenAI semconv plus roma attributes, attributed to the right module.
    lm = by_name.get(LM_SPAN, [])
    assert len(lm) == 3, [s["name"] for s in spans]  # planner 1, ReAct step 1, ReAct extract 1
    assert sorted(s["attributes"][sc.MODULE] for s in lm) == ["executor", "executor", "planner"]
    for s in lm:
        attrs = s["attributes"]
        assert s["kind"] == "SpanKind.CLIENT"
        assert attrs[sc.GEN_AI_OPERATION_NAME] == sc.OP_CHAT
        assert attrs[sc.GEN_AI_PROVIDER_NAME] == "openai"
        assert attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
        assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0
        assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] > 0
        assert attrs[sc.LM_COST_USD] > 0
        assert attrs[sc.LM_CACHE_HIT] is False
        assert attrs[sc.EXECUTION_ID] == root["attributes"][sc.EXECUTION_ID]

    # The plain function tool handed to ReAct.
    tool = [s for s in by_name.get(TOOL_SPAN, []) if sc.TOOLKIT_CLASS in s["attributes"]]
    assert len(tool) == 1, sorted(by_name)
    assert tool[0]["attributes"][sc.TOOLKIT_CLASS] == "dspy.Tool"
    assert tool[0]["attributes"][sc.GEN_AI_TOOL_NAME] == "lookup_city"
    assert tool[0]["attributes"][sc.TOOL_SUCCESS] is True
    assert tool[0]["attributes"][sc.MODULE] == "executor"

    # One trace, service name from OTEL_SERVICE_NAME.
    roma = _roma_spans(spans)
    assert len({s["context"]["trace_id"] for s in roma}) == 1
    assert {s["resource"]["attributes"]["service.name"] for s in roma} == {"zc"}


def test_zero_code_scrape_has_the_contract_series(runs: dict[str, AppRun]) -> None:
    run = runs["enabled"]
    samples = run.samples()
    names = {s.name for s in samples}
    missing = [n for n in EXERCISED if n not in names]
    assert not missing, f"contract series missing: {missing}\nhave: {sorted(names)}"

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    tool = {sc.L_TOOLKIT_CLASS: "dspy.Tool", sc.L_TOOL_NAME: "lookup_city"}
    assert total("tool_invocations_total", **tool) == 1
    assert total("tool_invocations_success_total", **tool) == 1
    assert total("tool_duration_ms_count", **tool) == 1
    assert total("tool_duration_ms_bucket", le="+Inf", **tool) == 1
    assert total("lm_calls_total", module="planner") == 1
    assert total("lm_calls_total", module="executor") == 2
    assert total("executions_total", status="completed") == 1
    if scope_labelled(samples):  # exporters from 0.64b0 say which scope made each sample
        assert {s.labels.get("otel_scope_name") for s in samples if s.name == "lm_calls_total"} == {"roma_otel"}
    assert {s.labels["le"] for s in samples if s.name == "tool_duration_ms_bucket"} == {
        repr(b) for b in sc.TOOL_DURATION_MS_BUCKETS
    } | {"+Inf"}


def test_zero_code_series_match_the_in_process_endpoint(runs: dict[str, AppRun], tmp_path: Path) -> None:
    """Run the same app in-process behind roma-otel's own endpoint: same series names, same label keys."""
    import urllib.request as request

    import dspy

    spec = importlib.util.spec_from_file_location("zero_code_app_inprocess", APP)
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)

    cfg = default_config()
    cfg.observability.prometheus.enabled = True
    cfg.observability.prometheus.port = 0
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(config=cfg)
    try:
        spec.loader.exec_module(app)  # classes defined after instrument(): the subclass hook sees them
        with dspy.context(lm=dspy.LM("openai/gpt-4o-mini", mock_response=app.MOCK, cache=False)):
            assert app.TravelAgent()(question="What is Rome?").answer == ANSWER
        with request.urlopen(instrumentor.prometheus_endpoint.url, timeout=10) as response:
            in_process = response.read().decode("utf-8")
    finally:
        instrumentor.uninstrument()

    def series(text: str) -> dict[str, set[frozenset[str]]]:
        out: dict[str, set[frozenset[str]]] = {}
        for family in text_string_to_metric_families(text):
            for s in roma_samples(list(family.samples)):
                out.setdefault(s.name, set()).add(_own(s.labels))
        return out

    zero_code = series(runs["enabled"].scrape)
    mine = series(in_process)
    assert set(zero_code) == set(mine)
    assert zero_code == mine
    assert set(EXERCISED) <= set(mine)


# --- roma-otel disabled by OTEL_PYTHON_DISABLED_INSTRUMENTATIONS ---------------------------------------
def test_disabled_instrumentation_emits_no_roma_spans_or_metrics(runs: dict[str, AppRun]) -> None:
    run = runs["disabled"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"answer: {ANSWER}" in run.stderr  # the app itself is unaffected
    spans = run.spans()
    assert _roma_spans(spans) == []
    assert [s["name"] for s in spans if s["name"] in (LM_SPAN, TOOL_SPAN)] == []

    samples = run.samples()
    assert samples, "the SDK's Prometheus endpoint should still answer"
    assert [s.name for s in roma_samples(samples)] == []
    contract = {n for n in sc.PROMETHEUS_SERIES} | {"lm_cost_unknown_total", "roma_otel_instrumentation_errors_total"}
    assert [s.name for s in samples if s.name in contract] == []


# --- the entry point and dependency metadata --------------------------------------------------------------
def test_entry_point_loads_the_instrumentor() -> None:
    eps = importlib.metadata.entry_points(group="opentelemetry_instrumentor")
    ours = [ep for ep in eps if ep.name == "roma_otel"]
    assert len(ours) == 1
    assert ours[0].value == "roma_otel.instrumentation:RomaInstrumentor"
    assert ours[0].load() is RomaInstrumentor


def test_instrumentation_dependencies_match_the_instruments_extra() -> None:
    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    deps = RomaInstrumentor().instrumentation_dependencies()
    assert tuple(deps) == tuple(_instruments)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = pyproject["project"]["optional-dependencies"]["instruments"]
    assert list(extra) == list(_instruments)
    # The installed DSPy satisfies it, so opentelemetry-instrument will not skip roma-otel.
    assert get_dependency_conflicts(list(deps)) is None


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread writer", "writer process"])
def test_zero_code_postgres_rows_arrive(tmp_path: Path, pg_dsn: str, writer_process: bool) -> None:
    """A new user's Postgres set-up under opentelemetry-instrument: a YAML config, no code. The rows arrive
    (with the writer process, through it; it must not instrument itself: no second writer, no spans)."""
    import psycopg

    from roma_otel.storage.migrate import upgrade

    upgrade(pg_dsn)
    config = tmp_path / "roma-otel.yaml"
    config.write_text(
        f"storage:\n  postgres:\n    enabled: true\n    connection_url: {pg_dsn}\n"
        f"    writer_process: {str(writer_process).lower()}\n"
    )
    app = _Launched(
        tmp_path, "postgres", {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "dspy", "ROMA_OTEL_CONFIG": str(config)}
    )
    try:
        app.wait_ready()
        scrape = app.scrape()
        app.release()
        run = app.result(scrape)
    finally:
        app.close()
    assert run.returncode == 0, run.stderr[-4000:]
    assert "writing rows from this process instead" not in run.stderr  # the child started and stayed up
    assert "roma-otel writer:" not in run.stderr  # and logged no warning of its own
    with psycopg.connect(pg_dsn) as conn:
        executions = conn.execute("SELECT execution_id, status FROM executions").fetchall()
        lm_rows = conn.execute("SELECT count(*) FROM lm_traces").fetchone()[0]
    span_executions = {
        s["attributes"]["roma.execution.id"] for s in _roma_spans(run.spans()) if "roma.execution.id" in s["attributes"]
    }
    assert executions and {e for e, _ in executions} == span_executions
    assert all(status == "completed" for _, status in executions)
    llm_spans = [s for s in run.spans() if s["attributes"].get("gen_ai.operation.name") == "chat"]
    assert lm_rows == len(llm_spans) > 0

"""Shared fixtures: a fresh TracerProvider/MeterProvider with in-memory exporters per test, instrumented.

The stand-in ``roma_dspy`` package (tests/standin) is put on sys.path first, so instrumentation sees
ROMA's shapes exactly as it would with the real package installed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
STANDIN = Path(__file__).parent / "standin"
sys.path.insert(0, str(STANDIN))

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from roma_otel import RomaInstrumentor  # noqa: E402
from roma_otel.config import RomaOtelConfig, default_config  # noqa: E402


@dataclass
class Telemetry:
    """What a test reads back: finished spans and collected metric points."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    instrumentor: RomaInstrumentor

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def spans_named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def span(self, name: str) -> ReadableSpan:
        found = self.spans_named(name)
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        if span.parent is None:
            return None
        for s in self.spans():
            if s.context.span_id == span.parent.span_id:
                return s
        return None

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> data points, from one collection."""
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of a counter's values (or a histogram's counts) over points matching ``labels``."""
        total = 0.0
        for point in self.metrics().get(name, []):
            if all(point.attributes.get(k) == v for k, v in labels.items()):
                total += point.value if hasattr(point, "value") else point.count
        return total


def make_telemetry(config: RomaOtelConfig | None = None, sampler: Any = None) -> Telemetry:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        config=config or default_config(),
    )
    return Telemetry(exporter, reader, tracer_provider, meter_provider, instrumentor)


@pytest.fixture
def make_tel() -> Iterator[Any]:
    """Factory: instrument with a given config/sampler; uninstruments at teardown."""
    made: list[Telemetry] = []

    def factory(config: RomaOtelConfig | None = None, sampler: Any = None) -> Telemetry:
        tel = make_telemetry(config, sampler)
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.instrumentor.uninstrument()
        tel.meter_provider.shutdown()


@pytest.fixture
def tel(make_tel: Any) -> Telemetry:
    """Instrumented with the default config."""
    return make_tel()


@pytest.fixture(autouse=True)
def _reset_dspy() -> Iterator[None]:
    import dspy

    yield
    dspy.configure(lm=None)
    instrumentor = RomaInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def _inline_litellm_logging() -> None:
    """Run litellm's async logging callbacks as plain tasks instead of through its LoggingWorker.

    litellm 1.78 (ROMA's lock) queues them to one global LoggingWorker task; when ``asyncio.run`` ends,
    cancelling that worker can wait forever on the callback it is running (seen with and without
    roma-otel: dspy 3.0.4b1, six concurrent ``acall`` in one ``asyncio.run``). Tests run many loops; a
    plain task per callback ends with its loop. Newer litellm does not hang either way.
    """
    import asyncio

    try:
        from litellm.litellm_core_utils import logging_worker
    except ImportError:
        return
    worker = getattr(logging_worker, "GLOBAL_LOGGING_WORKER", None)
    if worker is None or not hasattr(worker, "ensure_initialized_and_enqueue"):
        return

    def enqueue(async_coroutine: Any) -> None:
        asyncio.get_running_loop().create_task(async_coroutine)

    worker.ensure_initialized_and_enqueue = enqueue


_inline_litellm_logging()


def answer_lm(model: str = "openai/gpt-4o-mini", **fields: str) -> Any:
    """A real ``dspy.LM`` whose litellm call returns a fixed ChatAdapter reply, offline."""
    import dspy

    body = "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"
    return dspy.LM(model, mock_response=body, cache=False)


# --- PostgreSQL ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real ``mlflow server`` shared by the session's MLflow tests (``tests.mlflowserver.Server``)."""
    pytest.importorskip("mlflow")
    from tests.mlflowserver import run_server

    with run_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A superuser DSN: ROMA_OTEL_TEST_DSN, else a throwaway cluster this session starts on loopback."""
    from tests.pgserver import DSN_ENV, PostgresServer, find_bindir, wait_ready

    if os.environ.get(DSN_ENV):
        yield os.environ[DSN_ENV]
        return
    bindir = find_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; scripts/setup.sh installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bindir).start()
    try:
        wait_ready(server.dsn)
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    import uuid

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(pg_server_dsn)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- Prometheus samples made by roma-otel --------------------------------------------------------------
_PROM_UNITS = {"s": "_seconds", "ms": "_milliseconds"}
_PROM_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _roma_metric_names() -> frozenset[str]:
    from roma_otel import semconv as sc

    names = set()
    for key, value in vars(sc).items():
        if key.startswith("M_") and isinstance(value, tuple) and len(value) == 3:
            name, unit, _ = value
            names.add(name.replace(".", "_") + _PROM_UNITS.get(unit, ""))
    return frozenset(names)


def scope_labelled(samples: list[Any]) -> bool:
    """The exporter labels samples with their instrumentation scope (``otel_scope_name``, from 0.64b0)."""
    return any("otel_scope_name" in s.labels for s in samples)


def roma_samples(samples: list[Any]) -> list[Any]:
    """The samples roma-otel's instruments made: by scope label where the exporter adds one, else by the
    metric names semconv defines (exporters before 0.64b0 carry no scope label)."""
    if scope_labelled(samples):
        return [s for s in samples if s.labels.get("otel_scope_name") == "roma_otel"]
    names = _roma_metric_names()
    out = []
    for s in samples:
        base = s.name
        for suffix in _PROM_SUFFIXES:
            if base.endswith(suffix) and base[: -len(suffix)] in names:
                base = base[: -len(suffix)]
                break
        if base in names:
            out.append(s)
    return out

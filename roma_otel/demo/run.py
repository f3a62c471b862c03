"""``roma-otel demo``: run the ROMA-style agent under roma-otel and show what it recorded.

Spans go to memory, to Postgres (a configured database, else a throwaway local server) and to OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; metrics are served on the Prometheus endpoint while the agent runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from roma_otel import semconv as sc
from roma_otel.config import ConfigError
from roma_otel.report import (
    DatabaseUnavailableError,
    ExecutionNotFoundError,
    fetch_report,
    redact_dsn,
    render_tools,
    report_from_spans,
    tool_rows,
)

__all__ = ["run_demo"]

_SCOPE_LABELS = re.compile(r',?otel_scope_[a-z_]+="[^"]*"')


class _Progress(SpanProcessor):
    """Prints a line as each task of the tree finishes, so a long (real-model) run shows progress."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def on_end(self, span: ReadableSpan) -> None:
        if span.name != sc.SPAN_TASK:
            return
        attrs = span.attributes or {}
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        mark = "✗" if span.status.status_code.name == "ERROR" else "✓"
        goal = str(attrs.get(sc.TASK_GOAL, ""))[:70]
        # One write per line: print() writes the text and the newline separately, and tasks finishing
        # at once on two threads would share a line.
        self.out.write(f"  {mark} task done [depth {attrs.get(sc.TASK_DEPTH)}] {goal} ({ms:.0f} ms)\n")
        self.out.flush()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _contract_lines(text: str) -> list[str]:
    wanted = ("tool_invocations_total", "tool_invocations_failed_total", "lm_calls_total", "lm_cost_usd_total",
              "executions_total", "tasks_total", "toolkit_lifecycle_events_total")  # fmt: skip
    # The scope labels are the same on every series; leave them out of the printout.
    return [_SCOPE_LABELS.sub("", line).replace("{,", "{") for line in text.splitlines() if line.startswith(wanted)]


@dataclass
class _Persistence:
    """Where the run's rows go: ``dsn`` (None when persistence is off) and the throwaway server, if any."""

    dsn: str | None = None
    server: Any = None
    note: str = ""
    report_command: str = "roma-otel report"


class PostgresSetupError(RuntimeError):
    """A configured database could not be migrated."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _setup_postgres(url: str | None, enabled: bool) -> _Persistence:
    """Pick the database (``url``, else the configured one, else a throwaway local server) and migrate it."""
    if not enabled:
        return _Persistence(note="Postgres persistence: off (--no-postgres)")
    try:
        import alembic  # noqa: F401
        import psycopg  # noqa: F401

        from roma_otel.storage.localpg import PostgresServer, find_bindir, wait_ready
        from roma_otel.storage.migrate import resolve_database_url, upgrade
    except ImportError as exc:
        return _Persistence(
            note=f"Postgres persistence skipped: {exc.name} is not installed (pip install 'roma-otel[postgres]')"
        )
    try:
        dsn: str | None = resolve_database_url(url)
    except ConfigError:
        dsn = None
    if dsn:
        try:
            upgrade(dsn)
        except ConfigError:
            raise
        except Exception as exc:
            raise PostgresSetupError(
                f"cannot migrate PostgreSQL at {redact_dsn(dsn)}: {_first_line(exc)} "
                "(fix the URL, or pass --no-postgres to run without persistence)"
            ) from exc
        command = "roma-otel report" + (" --url URL" if url else "")
        return _Persistence(dsn, note=f"Postgres: writing to {redact_dsn(dsn)}", report_command=command)
    bindir = find_bindir()
    if bindir is None:
        return _Persistence(
            note="Postgres persistence skipped: no database URL configured (--url, ROMA_OTEL_DATABASE_URL, "
            "DATABASE_URL) and no PostgreSQL server binaries (initdb, pg_ctl) found to start a throwaway one"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
        wait_ready(server.dsn)
        upgrade(server.dsn)
    except Exception as exc:
        server.stop()
        return _Persistence(
            note=f"Postgres persistence skipped: cannot start a throwaway server from {bindir}: {_first_line(exc)}"
        )
    return _Persistence(server.dsn, server, note=f"Postgres: throwaway server {server.dsn} (stopped at exit)")


@contextlib.contextmanager
def _exit_cleanly_on_sigterm() -> Iterator[None]:
    """While a throwaway server runs, turn SIGTERM into SystemExit so the server is stopped, not leaked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execution_id(spans: Any) -> str | None:
    from roma_otel.storage.rows import ROOT, classify

    roots = [s for s in spans if classify(s) == ROOT]
    return str(roots[-1].attributes[sc.EXECUTION_ID]) if roots else None


def _serve(keep_serving: float, endpoint_url: str, out: TextIO) -> None:
    forever = keep_serving <= 0
    print(
        f"\nServing metrics at {endpoint_url} " + ("until Ctrl-C" if forever else f"for {keep_serving:.0f} s") + ".",
        file=out,
        flush=True,
    )
    deadline = None if forever else time.monotonic() + keep_serving
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


def run_demo(
    *,
    goal: str | None = None,
    model: str | None = None,
    offline: bool = True,
    max_depth: int = 2,
    use_async: bool = False,
    host: str = "127.0.0.1",
    port: int = 9464,
    keep_serving: float | None = None,
    url: str | None = None,
    postgres: bool = True,
    repeat: int = 1,
    interval: float = 0.0,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    if repeat < 1:
        print(f"roma-otel: error: --repeat must be at least 1, got {repeat}", file=sys.stderr)
        return 2
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from roma_otel import load_config

    config = load_config()
    try:
        persist = _setup_postgres(url, postgres)
    except PostgresSetupError as exc:
        print(f"roma-otel: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as cleanup:
        if persist.server is not None:
            cleanup.callback(persist.server.stop)
            cleanup.enter_context(_exit_cleanly_on_sigterm())
        return _run(persist, config, goal=goal, model=model, offline=offline, max_depth=max_depth,
                    use_async=use_async, host=host, port=port, keep_serving=keep_serving, repeat=repeat,
                    interval=interval, out=out)  # fmt: skip


def _run(
    persist: _Persistence,
    config: Any,
    *,
    goal: str | None,
    model: str | None,
    offline: bool,
    max_depth: int,
    use_async: bool,
    host: str,
    port: int,
    keep_serving: float | None,
    repeat: int,
    interval: float,
    out: TextIO,
) -> int:
    import dspy

    from roma_otel import RomaInstrumentor
    from roma_otel.demo.agent import DEMO_GOAL, build_offline_lm, run_demo_agent

    goal = goal or DEMO_GOAL
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "roma-otel-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(_Progress(out))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    config.observability.prometheus.enabled = True
    config.observability.prometheus.host = host
    config.observability.prometheus.port = port
    config.storage.postgres.enabled = persist.dsn is not None
    if persist.dsn is not None:
        config.storage.postgres.connection_url = persist.dsn
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(tracer_provider=provider, config=config)
    endpoint: Any = instrumentor.prometheus_endpoint
    writer: Any = getattr(instrumentor, "_postgres", None)
    if writer is not None and persist.server is not None:
        # A throwaway database neither takes nor leaves rows in the user's spool (~/.roma-otel/spool).
        writer.spool_dir = persist.server.root / "spool"
    try:
        lm = build_offline_lm(model or "openai/gpt-4o-mini") if offline else dspy.LM(model or "openai/gpt-4o-mini")
        kind = "offline LM (litellm mock responses, real token and cost accounting)" if offline else "live LM"
        print(f"roma-otel demo: goal={goal!r}\n  model={lm.model} via {kind}", file=out)
        print(f"  Prometheus metrics: {endpoint.url}", file=out)
        print(f"  {persist.note}\n", file=out, flush=True)
        for run in range(1, repeat + 1):
            if run == repeat:
                memory.clear()  # the report shows the last run; the metrics keep counting every run
            started = time.monotonic()
            result = run_demo_agent(goal, lm=lm, max_depth=max_depth, use_async=use_async)
            if repeat > 1:
                print(
                    f"run {run}/{repeat}: {result.status} in {time.monotonic() - started:.1f} s", file=out, flush=True
                )
                if run < repeat and interval > 0:
                    time.sleep(interval)
        provider.force_flush()
        spans = memory.get_finished_spans()
        execution_id = _execution_id(spans)

        report = None
        if writer is not None and persist.dsn is not None and execution_id is not None:
            if not writer.force_flush(30_000):
                print("\n(the Postgres writer did not finish in 30 s)", file=out)
            try:
                report = fetch_report(persist.dsn, execution_id)
                print(f"\nReport, read back from Postgres (`roma-otel report {execution_id}`):\n", file=out)
            except (DatabaseUnavailableError, ExecutionNotFoundError) as exc:
                print(f"\n(cannot read the execution back from Postgres: {exc})", file=out)
        if report is None:
            report = report_from_spans(spans)
            print("\nReport, from the run's spans:\n", file=out)
        print(report, file=out)
        print("\nTools (all calls):", file=out)
        print(render_tools(tool_rows(spans)), file=out)
        print(f"\nStatus: {result.status}\nAnswer: {result.answer}", file=out)
        print(f"\nExecution id: {execution_id}", file=out)
        if persist.dsn is not None and persist.server is None:
            print(f"  stored in {redact_dsn(persist.dsn)}: `{persist.report_command} {execution_id}`", file=out)
        print(f"\nA few series scraped from {endpoint.url}:", file=out)
        for line in _contract_lines(_scrape(endpoint.url)):
            print(f"  {line}", file=out)
        if keep_serving is not None:
            if persist.server is not None:
                dsn = persist.server.dsn
                print(
                    f"\nPostgreSQL (throwaway) stays up while serving, at {dsn}\n"
                    f"  psql {dsn}\n  roma-otel report {execution_id} --url {dsn}\n  roma-otel serve --url {dsn}",
                    file=out,
                )
            _serve(keep_serving, endpoint.url, out)
        return 0 if result.status == "completed" else 1
    finally:
        instrumentor.uninstrument()
        provider.shutdown()

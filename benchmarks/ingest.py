"""Postgres ingestion: roma-otel's writer against a raw COPY and against one INSERT per transaction.

Needs a PostgreSQL server: ``--dsn`` (an empty database; the schema is created with the migrations) or,
by default, a throwaway cluster started like the test suite does. Usage:

    python benchmarks/ingest.py [--rows 20000] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import psycopg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import roma_otel
from roma_otel.config import default_config
from roma_otel.exporters.postgres import PostgresSpanProcessor
from roma_otel.exporters.postgres_process import PostgresProcessSpanProcessor
from roma_otel.storage.localpg import PostgresServer, find_bindir, wait_ready
from roma_otel.storage.migrate import upgrade
from roma_otel.storage.rows import classify, tool_invocation_row

TOOL_COLUMNS = (
    "execution_id", "toolkit_class", "tool_name", "invoked_at", "duration_ms", "input_size_bytes",
    "output_size_bytes", "success", "error", "metadata",
)  # fmt: skip


@roma_otel.toolkit
class Bench:
    def lookup(self, key: str) -> str:
        return key * 3


def make_spans(n: int) -> list[Any]:
    """``n`` real finished tool spans (plus their execution's root), made by the instrumentation."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = roma_otel.RomaInstrumentor()
    inst.instrument(tracer_provider=provider, meter_provider=MeterProvider(), config=default_config())
    tool = Bench()
    with roma_otel.execution("ingest benchmark"):
        for i in range(n):
            tool.lookup(f"k{i}")
    inst.uninstrument()
    return list(exporter.get_finished_spans())


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE executions CASCADE")


def count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM tool_invocation_traces").fetchone()[0]


def ingest_writer(dsn: str, spans: list[Any], batch_size: int, process: bool) -> float:
    """Seconds from handing the first span to the writer until every row is committed."""
    kind = PostgresProcessSpanProcessor if process else PostgresSpanProcessor
    with tempfile.TemporaryDirectory() as spool:
        # Every span is handed over at once: a queue bound below that would measure drops, not throughput.
        queue = max(100_000, 2 * len(spans))
        writer = kind(dsn, batch_size=batch_size, spool_dir=spool, flush_interval=0.05, max_queue_size=queue)
        try:
            assert writer.force_flush(30_000)  # connected (the writer process has started and is waiting)
            start = time.perf_counter()
            for span in spans:
                writer.on_end(span)
            assert writer.force_flush(600_000)
            return time.perf_counter() - start
        finally:
            writer.shutdown()


def _rows(spans: list[Any]) -> tuple[str, list[list[Any]]]:
    from datetime import UTC, datetime

    from psycopg.types.json import Jsonb

    rows = [tool_invocation_row(s) for s in spans if classify(s) == "tool"]
    for row in rows:
        row["invoked_at"] = datetime.fromtimestamp(row.pop("invoked_at_ns") / 1e9, UTC)
        row["metadata"] = Jsonb(row["metadata"])
    return rows[0]["execution_id"], [[r[c] for c in TOOL_COLUMNS] for r in rows]


def raw_copy(dsn: str, spans: list[Any]) -> float:
    """Seconds for one COPY of the same rows (already translated: the floor for any writer)."""
    execution_id, rows = _rows(spans)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO executions (execution_id) VALUES (%s)", (execution_id,))
        conn.commit()
        start = time.perf_counter()
        statement = f"COPY tool_invocation_traces ({', '.join(TOOL_COLUMNS)}) FROM STDIN"
        with conn.cursor() as cur, cur.copy(statement) as cp:
            for row in rows:
                cp.write_row(row)
        conn.commit()
        return time.perf_counter() - start


def insert_per_transaction(dsn: str, spans: list[Any], limit: int) -> tuple[float, int]:
    """ROMA's way: one INSERT per row, one transaction each. Returns (seconds, rows)."""
    execution_id, rows = _rows(spans)
    rows = rows[:limit]
    sql = (
        f"INSERT INTO tool_invocation_traces ({', '.join(TOOL_COLUMNS)}) "
        f"VALUES ({', '.join(['%s'] * len(TOOL_COLUMNS))})"
    )
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO executions (execution_id) VALUES (%s)", (execution_id,))
        conn.commit()
        start = time.perf_counter()
        for row in rows:
            conn.execute(sql, row)
            conn.commit()
        return time.perf_counter() - start, len(rows)


class DiscardingExporter(SpanExporter):
    """The application's usual span pipeline (a BatchSpanProcessor feeding an exporter), minus the network."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


APP_CONFIGS = ("writer off", "writer on, thread", "writer on, process")
APP_METRICS = ("wall", "thread", "cpu", "backlog")


_CPUS = sorted(os.sched_getaffinity(0))  # before any pinning


def _pin(writer: Any, server: PostgresServer) -> None:
    """Postgres and the writer's child process on the last CPU (the application is on the first)."""
    last = {_CPUS[-1]}
    child = getattr(writer, "_proc", None)
    for pid in server.processes() + ([child.pid] if child is not None else []):
        try:
            os.sched_setaffinity(pid, last)
        except OSError:  # gone, or not ours to move
            pass


def app_overhead(
    dsn: str, calls: int, rounds: int, pin: PostgresServer | None = None
) -> dict[str, dict[str, float]]:
    """Per configuration, interleaved round by round, medians of:

    - ``wall``: µs per instrumented tool call on the application thread, during the loop;
    - ``thread``: the application thread's own CPU µs per call during the loop (``wall`` also counts the
      time it waits for the GIL while the SDK's export thread, the writer thread or the feeder holds it);
    - ``backlog``: the loop's spans still queued in the application when the loop ends (in the writer
      process's case, not counting what its child has received and not written yet);
    - ``cpu``: CPU µs per call of the whole application process (every thread: the loop, the SDK's
      export thread, the writer thread or the feeder), from the loop's start until the writer has
      taken every span of the loop (``force_flush``). A writer that falls behind costs the loop less
      than one that keeps up, because its work happens after the loop: ``wall`` alone would flatter
      it, and its queue would keep growing under a longer load. ``cpu`` charges that deferred work to
      the calls that caused it; a child writer process and the Postgres server are not counted (they
      do not hold the application's GIL), though they share the machine's two cores with it.

    Every configuration exports its spans through a BatchSpanProcessor (as any real set-up does), so
    "writer off" pays the SDK's per-span export hand-over too and the difference is the writer's alone.
    ``pin`` (the benchmark's own cluster): every configuration runs with the application's
    threads on the first CPU and that Postgres server and the writer's child process on the last, as where
    the database has a host of its own and the writer a spare core (by default they all share every core
    with the application).
    One MeterProvider serves every round and is collected after each measurement (a scrape), so queued
    histogram values never pile up into a later measurement.
    """
    metrics: dict[str, dict[str, list[float]]] = {m: {name: [] for name in APP_CONFIGS} for m in APP_METRICS}
    tool = Bench()
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    order = list(APP_CONFIGS)
    if pin is not None:  # before any thread of the measurement starts: threads inherit their creator's CPUs
        os.sched_setaffinity(0, {_CPUS[0]})
    for round_ in range(rounds):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:  # rotate who goes first
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(DiscardingExporter(), max_queue_size=1 << 16))
            config = default_config()
            if name != "writer off":
                config.storage.postgres.enabled = True
                config.storage.postgres.connection_url = dsn
                config.storage.postgres.writer_process = name.endswith("process")
            inst = roma_otel.RomaInstrumentor()
            inst.instrument(tracer_provider=provider, meter_provider=meter_provider, config=config)
            writer = inst._postgres
            if pin is not None:
                _pin(writer, pin)
            try:
                with roma_otel.execution("overhead"):
                    for i in range(100):
                        tool.lookup(str(i))
                    if writer is not None:  # the steady state, not the writer's start-up
                        assert writer.force_flush(30_000)
                    reader.get_metrics_data()
                    gc.collect()
                    cpu_start = time.process_time()
                    thread_start = time.thread_time()
                    start = time.perf_counter()
                    for i in range(calls):
                        tool.lookup(str(i))
                    metrics["wall"][name].append((time.perf_counter() - start) / calls * 1e6)
                    metrics["thread"][name].append((time.thread_time() - thread_start) / calls * 1e6)
                    metrics["backlog"][name].append(writer.queued if writer is not None else 0)
                    if writer is not None:
                        assert writer.force_flush(120_000)
                    provider.force_flush()  # the SDK's export thread's share, in every configuration alike
                    metrics["cpu"][name].append((time.process_time() - cpu_start) / calls * 1e6)
                    reader.get_metrics_data()
            finally:
                inst.uninstrument()
                provider.shutdown()
            reset(dsn)
    return {m: {name: statistics.median(v) for name, v in by_name.items()} for m, by_name in metrics.items()}


def ingestion(dsn: str, args: argparse.Namespace) -> None:
    spans = make_spans(args.rows)
    times: dict[str, list[float]] = {"thread": [], "process": [], "copy": [], "insert": []}
    for _ in range(args.rounds):
        for process in (False, True):
            reset(dsn)
            times["process" if process else "thread"].append(ingest_writer(dsn, spans, args.batch_size, process))
            assert count(dsn) == args.rows, count(dsn)
        reset(dsn)
        times["copy"].append(raw_copy(dsn, spans))
        reset(dsn)
        seconds, n = insert_per_transaction(dsn, spans, args.insert_rows)
        times["insert"].append(seconds / n)
        reset(dsn)
    rate = {k: args.rows / statistics.median(v) for k, v in times.items() if k != "insert"}
    insert_rate = 1 / statistics.median(times["insert"])
    print(f"rows={args.rows} batch_size={args.batch_size} rounds={args.rounds} (medians)")
    print("| path | rows/s |")
    print("|---|---:|")
    print(f"| roma-otel writer on a thread, span end → committed row | {rate['thread']:,.0f} |")
    print(f"| roma-otel writer process, span end → committed row | {rate['process']:,.0f} |")
    print(f"| raw COPY of the same (pre-translated) rows | {rate['copy']:,.0f} |")
    print(f"| one INSERT per transaction ({args.insert_rows} rows) | {insert_rate:,.0f} |")
    print(f"\nwriter / raw COPY = {rate['thread'] / rate['copy']:.2f} on a thread, "
          f"{rate['process'] / rate['copy']:.2f} as a process (target ≥ 0.8)")  # fmt: skip
    print(f"writer / INSERT-per-transaction = {rate['process'] / insert_rate:.1f}")


@contextlib.contextmanager
def benchmark_database(dsn: str | None) -> Iterator[tuple[str, PostgresServer | None]]:
    """``dsn``, migrated; without one, a throwaway cluster started like the test suite does (and its server,
    stopped afterwards). Exits with status 2 when there is neither a DSN nor PostgreSQL's server binaries."""
    server = None
    if dsn is None:
        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL server binaries found; pass --dsn", file=sys.stderr)
            raise SystemExit(2)
        server = PostgresServer(bindir).start()
        dsn = server.dsn
        wait_ready(dsn)
    try:
        upgrade(dsn)
        yield dsn, server
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--insert-rows", type=int, default=2_000, help="rows for the slow INSERT-per-transaction loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--app-calls", type=int, default=10_000, help="tool calls per app-thread measurement")
    parser.add_argument("--app-rounds", type=int, default=9)
    parser.add_argument("--skip-ingest", action="store_true", help="only the application-thread comparison")
    parser.add_argument(
        "--pin", action="store_true", help="application on the first CPU; Postgres and the writer's child on the last"
    )
    parser.add_argument("--dsn")
    args = parser.parse_args(argv)
    if args.pin and (args.dsn is not None or len(_CPUS) < 2):
        print("--pin needs two CPUs and the benchmark's own cluster (no --dsn)", file=sys.stderr)
        return 2

    with benchmark_database(args.dsn) as (dsn, server):
        if not args.skip_ingest:
            ingestion(dsn, args)
        app = app_overhead(dsn, args.app_calls, args.app_rounds, server if args.pin else None)
        wall, thread, cpu, backlog = app["wall"], app["thread"], app["cpu"], app["backlog"]
        pinned = "; application on the first CPU, Postgres and the writer's child on the last" if args.pin else ""
        print(f"\napplication, one instrumented tool call inside an execution (medians over {args.app_rounds} rounds "
              f"of {args.app_calls} calls; target: writer on ≤ 1.1 × writer off{pinned}):")  # fmt: skip
        print("| configuration | loop µs/call | × off | application thread CPU µs/call | × off | "
              "spans still queued at the loop's end | "
              "process CPU µs/call, loop + writer catching up | × off |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in APP_CONFIGS:
            print(f"| {name} | {wall[name]:.1f} | {wall[name] / wall['writer off']:.3f} | {thread[name]:.1f} | "
                  f"{thread[name] / thread['writer off']:.3f} | {backlog[name]:,.0f} | "
                  f"{cpu[name]:.1f} | {cpu[name] / cpu['writer off']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

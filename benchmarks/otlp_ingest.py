"""OTLP/HTTP ingest through ``roma-otel serve`` against the in-process writer and a raw COPY, in one run.

The same ``make_spans`` spans (``benchmarks/ingest.py``) go, round by round and in a rotating order, through:

- **raw COPY**: one COPY of the already translated rows (``benchmarks.ingest.raw_copy``): the floor;
- **in-process writer**: ``PostgresSpanProcessor`` on a thread (``benchmarks.ingest.ingest_writer``);
- **OTLP ingest**: ``roma-otel serve`` in a subprocess on the same database; the spans, encoded as OTLP
  protobuf requests *before* timing (the SDK's encoder costs far more than the receiver), are POSTed over
  keep-alive ``http.client`` connections from a few sender threads, timed from the first POST to the last
  200 (the receiver answers after commit, so a 200 is a committed row).

The tables are truncated between measurements and every row is counted after each. Afterwards the same
bodies are taken apart in this process, phase by phase (gunzip, ``storage.otlp.decode``, translation), to
show where a span's time goes; the serve process's and Postgres' CPU seconds during each measurement
(``/proc/PID/stat``) show which of the two is the bottleneck. Usage:

    python benchmarks/otlp_ingest.py [--rows 20000] [--rounds 10] [--spans-per-request 512] [--gzip]
        [--senders 2] [--otlp-connections 2] [--serve-workers 1] [--batch-size 500] [--pin] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import http.client
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from google.protobuf.internal import api_implementation
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import roma_otel
from benchmarks.ingest import benchmark_database, count, ingest_writer, make_spans, raw_copy, reset
from roma_otel.api.otlp import DEFAULT_MAX_BODY_BYTES
from roma_otel.config import default_config
from roma_otel.exporters.postgres import PostgresSpanProcessor, copy_payload
from roma_otel.exporters.postgres_process import SpanRecord
from roma_otel.storage import otlp
from roma_otel.storage.localpg import PostgresServer
from roma_otel.storage.otlp_lean import LeanRequest
from roma_otel.storage.rows import standalone_batch
from roma_otel.telemetry import SCOPE

PATHS = ("raw COPY", "in-process writer", "OTLP ingest")
DECODE = "decode (FromString + SpanRecords), first pass over the round's bodies"
_TICK = os.sysconf("SC_CLK_TCK")
_CPUS = sorted(os.sched_getaffinity(0))  # before any pinning
_LIMIT = DEFAULT_MAX_BODY_BYTES  # the receiver's default bound, as it decompresses


# --- CPU accounting -------------------------------------------------------------------------------
def _stat(pid: int) -> list[str]:
    # /proc/PID/stat: "pid (command) state ppid ...": fields from the state on (field 3 is index 0).
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) of ``pid``; with ``children``, plus those of its reaped children."""
    fields = _stat(pid)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16 and 17)
    return ticks / _TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live child processes (``serve --workers N``'s workers)."""
    total = process_cpu(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += process_cpu(int(child))
        except (OSError, ValueError, IndexError):
            pass
    return total


def postgres_cpu(server: PostgresServer | None) -> float:
    """CPU seconds of the whole cluster so far: every live process, plus the backends that have exited
    (the postmaster reaps them, so their time is in its cutime/cstime). A backend that exits between
    two readings counts as itself in the first and in the postmaster's children's time in the second."""
    if server is None:
        return float("nan")
    # A backend whose client just disconnected (the measured code's, or reset()'s) may be exiting: one
    # reaped between the listing and its own reading would be counted nowhere. Let it go first.
    time.sleep(0.05)
    pids = server.processes()
    total = 0.0
    for i, pid in enumerate(pids):
        try:
            total += process_cpu(pid, children=i == 0)
        except (OSError, ValueError, IndexError):  # gone meanwhile: already in the postmaster's cutime
            pass
    return total


def pin(serve_pid: int, server: PostgresServer | None) -> None:
    """This process and the serve process tree on the first CPU, Postgres on the last: each path's Python
    (raw COPY's client, the in-process writer, the receiver and its senders) gets one core, the database
    the other. Postgres backends started later inherit the postmaster's CPU."""
    first, last = {_CPUS[0]}, {_CPUS[-1]}
    serve = [serve_pid, *map(int, Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split())]
    targets = [(pid, first) for pid in serve] + [(pid, last) for pid in (server.processes() if server else [])]
    for pid, cpus in targets:
        for task in Path(f"/proc/{pid}/task").iterdir():  # every thread: affinity is per thread
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass
    os.sched_setaffinity(0, first)  # new threads of this process (the senders) inherit it


# --- the serve subprocess -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(dsn: str, port: int, connections: int, workers: int, log: Any) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable, "-m", "roma_otel.cli", "serve", "--url", dsn, "--port", str(port),
        "--log-level", "warning", "--otlp-connections", str(connections), "--workers", str(workers),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"roma-otel serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("roma-otel serve did not answer /health with 200 within 60 s")
        time.sleep(0.1)


# --- OTLP bodies and the senders ------------------------------------------------------------------
def encode_bodies(spans: list[Any], per_request: int, compress: bool) -> list[bytes]:
    """OTLP protobuf ExportTraceServiceRequest bodies, ``per_request`` spans each (gzipped if asked)."""
    bodies = []
    for i in range(0, len(spans), per_request):
        body = encode_spans(spans[i : i + per_request]).SerializeToString()
        bodies.append(gzip.compress(body, compresslevel=6) if compress else body)
    return bodies


def post_all(port: int, bodies: list[bytes], senders: int, compress: bool) -> float:
    """Seconds from the first POST to the last 200, ``senders`` keep-alive connections pulling bodies
    from one shared list. Raises if any answer is not a 200 with full success."""
    headers = {"Content-Type": otlp.PROTOBUF}
    if compress:
        headers["Content-Encoding"] = "gzip"
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=300) for _ in range(senders)]
    for conn in conns:
        conn.connect()  # before the clock: the TCP handshakes are not ingest
    next_index = itertools.count().__next__  # one C call: atomic under the GIL
    barrier = threading.Barrier(senders + 1)
    first: list[float] = []
    last: list[float] = []
    errors: list[str] = []

    def send(conn: http.client.HTTPConnection) -> None:
        barrier.wait()
        started = False
        try:
            while (i := next_index()) < len(bodies):
                if not started:
                    first.append(time.perf_counter())
                    started = True
                conn.request("POST", "/v1/traces", bodies[i], headers)
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or data:  # an empty ExportTraceServiceResponse: all stored
                    errors.append(f"request {i}: HTTP {response.status}, body {data[:200]!r}")
                    return
            last.append(time.perf_counter())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=send, args=(conn,)) for conn in conns]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError("OTLP ingest failed: " + "; ".join(errors))
    return max(last) - min(first)


# --- where the time goes --------------------------------------------------------------------------
def _per_span(fn: Callable[[], Any], spans: int, repeats: int) -> float:
    """Median µs per span of ``fn`` (one pass over every body) over ``repeats`` passes."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / spans * 1e6


def breakdown(bodies: list[bytes], compress: bool, spans: int, repeats: int) -> dict[str, float]:
    """µs per span for each phase of the receiver's work, run here on the same bodies."""
    encoding = "gzip" if compress else None
    raw = [otlp.decompress(b, encoding, _LIMIT) for b in bodies]
    # The first pass over the round's new bodies meets the attribute cache as the server does: warm with
    # what earlier rounds' spans had in common, cold for this round's new values.
    gc.collect()
    start = time.perf_counter()
    decoded = [otlp.decode(b, otlp.PROTOBUF).records for b in raw]
    first_pass = (time.perf_counter() - start) / spans * 1e6
    assert sum(len(r) for r in decoded) == spans, (sum(len(r) for r in decoded), spans)
    result: dict[str, float] = {}
    if compress:
        result["gunzip"] = _per_span(lambda: [otlp.decompress(b, encoding, _LIMIT) for b in bodies], spans, repeats)
    result["protobuf parse alone (the lean schema's FromString)"] = _per_span(
        lambda: [LeanRequest.FromString(b) for b in raw], spans, repeats
    )

    def cold_decode() -> None:
        otlp._KV_CACHE.clear()  # no attribute of earlier rounds; within the pass, recurring ones still hit
        for b in raw:
            otlp.decode(b, otlp.PROTOBUF)

    result[DECODE] = first_pass
    result["  decode, attribute cache emptied before the pass"] = _per_span(cold_decode, spans, repeats)
    result["  decode, every attribute already seen (best case)"] = _per_span(
        lambda: [otlp.decode(b, otlp.PROTOBUF) for b in raw], spans, repeats
    )
    result["translation (standalone_batch + copy_payload)"] = _per_span(
        lambda: [copy_payload(standalone_batch(r)) for r in decoded], spans, repeats
    )
    result["  of which standalone_batch"] = _per_span(lambda: [standalone_batch(r) for r in decoded], spans, repeats)
    return result


def _full_schema_decode(body: bytes) -> list[SpanRecord]:
    """The receiver's decoder before the lean schema, kept here as the comparison: the whole request parsed
    with the real messages, every attribute read through the KeyValue/AnyValue wrappers."""
    records = []
    for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
        for scope_spans in resource_spans.scope_spans:
            if scope_spans.scope.name != SCOPE:
                continue
            for span in scope_spans.spans:
                attrs = {}
                for kv in span.attributes:
                    value = kv.value
                    which = value.WhichOneof("value")
                    attrs[kv.key] = getattr(value, which) if which in otlp._PB_SCALARS else otlp._pb_value(value, which)
                parent = span.parent_span_id
                records.append(SpanRecord(
                    span.name, int.from_bytes(span.trace_id, "big"), int.from_bytes(span.span_id, "big"),
                    int.from_bytes(parent, "big") if parent else None, span.start_time_unix_nano,
                    span.end_time_unix_nano, span.status.code, span.status.message or None, attrs,
                ))  # fmt: skip
    return records


def demo_decode(executions: int, repeats: int) -> dict[str, float]:
    """µs per span decoding the spans of real ``roma-otel demo`` executions (LM, module, task, tool and
    toolkit spans, with their previews, token counts and costs), one request per execution. The lean
    decoder meets each request with a cache warm from the *other* executions only, as a receiver would."""
    from roma_otel.demo.agent import run_demo_agent

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = roma_otel.RomaInstrumentor()
    inst.instrument(tracer_provider=provider, meter_provider=MeterProvider(), config=default_config())
    bodies = []
    try:
        for i in range(executions):
            exporter.clear()
            run_demo_agent(f"a weekend in city number {i}")
            bodies.append(encode_spans(exporter.get_finished_spans()).SerializeToString())
    finally:
        inst.uninstrument()
    warm, measured = bodies[: executions // 2], bodies[executions // 2 :]
    spans = sum(len(otlp.decode(b, otlp.PROTOBUF).records) for b in measured)
    def fields(records: list[SpanRecord]) -> list[tuple[Any, ...]]:
        return [tuple(getattr(r, a) for a in SpanRecord.__slots__) for r in records]

    rows = [row for b in measured for row in fields(_full_schema_decode(b))]
    lean = [row for b in measured for row in fields(otlp.decode(b, otlp.PROTOBUF).records)]
    assert rows == lean, "the lean decoder and the full-schema walk disagree"

    def lean_pass(cache: bool) -> float:
        otlp._KV_CACHE.clear()
        saved = otlp._KV_CACHE_BYTES
        otlp._KV_CACHE_BYTES = saved if cache else -1  # -1: nothing is ever cached
        try:
            for b in warm:
                otlp.decode(b, otlp.PROTOBUF)
            gc.collect()
            start = time.perf_counter()
            for b in measured:
                otlp.decode(b, otlp.PROTOBUF)
            return time.perf_counter() - start
        finally:
            otlp._KV_CACHE_BYTES = saved

    def median_of(fn: Callable[[], float]) -> float:
        return statistics.median(fn() for _ in range(repeats)) / spans * 1e6

    def full_pass() -> float:
        gc.collect()
        start = time.perf_counter()
        for b in measured:
            _full_schema_decode(b)
        return time.perf_counter() - start

    return {
        "full schema, every attribute through the wrappers (before)": median_of(full_pass),
        "lean schema + attribute cache warm from other executions (now)": median_of(lambda: lean_pass(True)),
        "lean schema, cache off: every attribute new (worst case)": median_of(lambda: lean_pass(False)),
        "spans measured": float(spans),
    }


def direct_write(
    dsn: str, server: PostgresServer | None, bodies: list[bytes], compress: bool, rows: int, repeats: int
) -> tuple[float, float]:
    """The receiver's database work alone: the requests' batches, translated ahead, written one after the
    other by ``PostgresSpanProcessor.write`` (the receiver's engine) on one connection from this process.
    Median (wall µs per span, Postgres CPU µs per span) over ``repeats`` passes."""
    encoding = "gzip" if compress else None
    raw = [otlp.decompress(b, encoding, _LIMIT) for b in bodies]
    batches = [standalone_batch(otlp.decode(b, otlp.PROTOBUF).records) for b in raw]
    prepared = [(batch, copy_payload(batch)) for batch in batches]
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(repeats):
        reset(dsn)
        engine = PostgresSpanProcessor(dsn, threaded=False, connect_early=False)  # a fresh one knows no execution
        try:
            engine._connection()  # connected before the clock
            gc.collect()
            pg0 = postgres_cpu(server)
            start = time.perf_counter()
            for batch, payload in prepared:
                engine.write(batch, payload)
            walls.append((time.perf_counter() - start) / rows * 1e6)
            cpus.append((postgres_cpu(server) - pg0) / rows * 1e6)
        finally:
            engine.flush_timeout = 0.0
            engine.shutdown()
        got = count(dsn)
        if got != rows:
            raise RuntimeError(f"direct write: {got} rows in tool_invocation_traces, expected {rows}")
    reset(dsn)
    return statistics.median(walls), statistics.median(cpus)


# --- the rounds -----------------------------------------------------------------------------------
def run(dsn: str, server: PostgresServer | None, args: argparse.Namespace) -> int:
    spans = make_spans(args.rows)
    assert len(spans) == args.rows + 1  # the tool spans and their execution's root
    bodies = encode_bodies(spans, args.spans_per_request, args.gzip)
    size = sum(len(b) for b in bodies)
    print(f"rows={args.rows} rounds={args.rounds} spans/request={args.spans_per_request} requests={len(bodies)} "
          f"({size / len(bodies) / 1024:.0f} KiB each{', gzip' if args.gzip else ''}) senders={args.senders} "
          f"otlp-connections={args.otlp_connections} serve-workers={args.serve_workers} writer batch={args.batch_size} "
          f"protobuf={api_implementation.Type()} cpus={os.cpu_count()}{' pinned' if args.pin else ''}")  # fmt: skip

    with tempfile.NamedTemporaryFile("w+b", prefix="roma-otel-serve-", suffix=".log") as log:
        port = free_port()
        proc = start_serve(dsn, port, args.otlp_connections, args.serve_workers, log)
        try:
            _rounds(dsn, server, args, spans, bodies, port, proc)
        except Exception:
            log.flush()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-4000:]
            print(f"--- roma-otel serve output ---\n{tail}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if args.demo_executions >= 2:
        # The benchmark's tool spans repeat 9 of their 10 attributes; real agents' spans repeat fewer.
        table = demo_decode(args.demo_executions, args.breakdown_repeats * 21)
        print(f"\ndecoding the spans of real `roma-otel demo` executions, µs per span "
              f"({table.pop('spans measured'):.0f} spans of {args.demo_executions - args.demo_executions // 2} "
              f"executions; median of {args.breakdown_repeats * 21} passes):")  # fmt: skip
        print("| decoder | µs/span |")
        print("|---|---:|")
        for name, value in table.items():
            print(f"| {name} | {value:.2f} |")
    return 0


def _rounds(
    dsn: str,
    server: PostgresServer | None,
    args: argparse.Namespace,
    spans: list[Any],
    bodies: list[bytes],
    port: int,
    proc: subprocess.Popen[bytes],
) -> int:
    n = args.rows
    # Warm-up, not counted: the receiver's first requests import and connect.
    reset(dsn)
    post_all(port, bodies, args.senders, args.gzip)
    if args.pin:
        pin(proc.pid, server)
    assert count(dsn) == n, count(dsn)

    # Fresh spans every round (a new execution id, new durations): the receiver caches decoded attributes,
    # and bodies it has already seen would be read entirely from that cache, as no real agent's are.
    fresh = {"spans": spans, "bodies": bodies}
    measure: dict[str, Callable[[], float]] = {
        "raw COPY": lambda: raw_copy(dsn, fresh["spans"]),
        "in-process writer": lambda: ingest_writer(dsn, fresh["spans"], args.batch_size, False),
        "OTLP ingest": lambda: post_all(port, fresh["bodies"], args.senders, args.gzip),
    }
    rate: dict[str, list[float]] = {p: [] for p in PATHS}
    pg_cpu: dict[str, list[float]] = {p: [] for p in PATHS}  # µs per span
    here_cpu: dict[str, list[float]] = {p: [] for p in PATHS}  # this process (the senders, for OTLP)
    serve_cpu: list[float] = []
    phases: dict[str, list[float]] = {}
    db_wall: list[float] = []
    db_cpu: list[float] = []
    order = list(PATHS)
    print("\n| round | raw COPY rows/s | in-process writer rows/s | OTLP rows/s | OTLP / raw COPY | OTLP / writer "
          "| serve CPU µs/span | Postgres CPU µs/span (COPY / writer / OTLP) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for round_ in range(args.rounds):
        spans = make_spans(n)
        bodies = encode_bodies(spans, args.spans_per_request, args.gzip)
        fresh.update(spans=spans, bodies=bodies)
        for path in order[round_ % 3 :] + order[: round_ % 3]:  # rotate who goes first
            reset(dsn)
            gc.collect()
            pg0, here0, serve0 = postgres_cpu(server), time.process_time(), tree_cpu(proc.pid)
            seconds = measure[path]()
            pg1, here1, serve1 = postgres_cpu(server), time.process_time(), tree_cpu(proc.pid)
            got = count(dsn)
            if got != n:
                raise RuntimeError(f"round {round_ + 1}, {path}: {got} rows in tool_invocation_traces, expected {n}")
            rate[path].append(n / seconds)
            pg_cpu[path].append((pg1 - pg0) / n * 1e6)
            here_cpu[path].append((here1 - here0) / n * 1e6)
            if path == "OTLP ingest":
                serve_cpu.append((serve1 - serve0) / n * 1e6)
        # Where the time goes, in the same round: the phases here, then the database alone.
        for name, value in breakdown(bodies, args.gzip, n + 1, args.breakdown_repeats).items():
            phases.setdefault(name, []).append(value)
        wall_, cpu_ = direct_write(dsn, server, bodies, args.gzip, n, args.breakdown_repeats)
        db_wall.append(wall_)
        db_cpu.append(cpu_)
        r = {p: rate[p][-1] for p in PATHS}
        print(f"| {round_ + 1} | {r['raw COPY']:,.0f} | {r['in-process writer']:,.0f} | {r['OTLP ingest']:,.0f} "
              f"| {r['OTLP ingest'] / r['raw COPY']:.2f} | {r['OTLP ingest'] / r['in-process writer']:.2f} "
              f"| {serve_cpu[-1]:.1f} | {pg_cpu['raw COPY'][-1]:.1f} / {pg_cpu['in-process writer'][-1]:.1f} "
              f"/ {pg_cpu['OTLP ingest'][-1]:.1f} |")  # fmt: skip
    reset(dsn)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    vs_copy = [o / c for o, c in zip(rate["OTLP ingest"], rate["raw COPY"], strict=True)]
    vs_writer = [o / w for o, w in zip(rate["OTLP ingest"], rate["in-process writer"], strict=True)]
    writer_vs_copy = [w / c for w, c in zip(rate["in-process writer"], rate["raw COPY"], strict=True)]
    print(f"| **median** | {med(rate['raw COPY']):,.0f} | {med(rate['in-process writer']):,.0f} "
          f"| {med(rate['OTLP ingest']):,.0f} | **{med(vs_copy):.2f}** | **{med(vs_writer):.2f}** "
          f"| {med(serve_cpu):.1f} | {med(pg_cpu['raw COPY']):.1f} / {med(pg_cpu['in-process writer']):.1f} "
          f"/ {med(pg_cpu['OTLP ingest']):.1f} |")  # fmt: skip
    met = sum(v >= 0.7 for v in vs_copy)
    print(f"\nOTLP / raw COPY: median of per-round ratios {med(vs_copy):.3f} (range {min(vs_copy):.2f}-"
          f"{max(vs_copy):.2f}; goal ≥ 0.7, met in {met} of {len(vs_copy)} rounds)")  # fmt: skip
    print(f"OTLP / in-process writer: {med(vs_writer):.3f} (range {min(vs_writer):.2f}-{max(vs_writer):.2f}); "
          f"in-process writer / raw COPY: {med(writer_vs_copy):.3f}")  # fmt: skip

    wall = {p: 1e6 / med(rate[p]) for p in PATHS}
    print("\nwhere a span's time goes, µs per span, medians over the rounds (phases: in this process on the "
          "same bodies, after each round's three measurements):")  # fmt: skip
    print("| | µs/span |")
    print("|---|---:|")
    for name, values in phases.items():
        print(f"| {name} | {med(values):.2f} |")
    python = sum(med(v) for k, v in phases.items() if not k.startswith("  ") and not k.startswith("protobuf"))
    print(f"| receiver's Python work measured here (gunzip + decode + translation) | {python:.2f} |")
    print(f"| serve process CPU during OTLP ingest (everything: HTTP, ASGI, decode, translation, psycopg) "
          f"| {med(serve_cpu):.2f} |")  # fmt: skip
    print(f"| rest of the serve process's CPU (HTTP, ASGI, threads, psycopg COPY) | {med(serve_cpu) - python:.2f} |")
    print(f"| senders' CPU (this process) during OTLP ingest | {med(here_cpu['OTLP ingest']):.2f} |")
    for path in PATHS:
        print(f"| Postgres CPU, {path} | {med(pg_cpu[path]):.2f} |")
    print(f"| benchmark process CPU, in-process writer (whole call: its start, translation, COPY client) "
          f"| {med(here_cpu['in-process writer']):.2f} |")  # fmt: skip
    print(f"| database alone: the requests' batches by PostgresSpanProcessor.write, one connection, wall "
          f"| {med(db_wall):.2f} |")  # fmt: skip
    print(f"| database alone, Postgres CPU | {med(db_cpu):.2f} |")
    for path in PATHS:
        print(f"| wall, {path} (1 / median rate) | {wall[path]:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="tool spans (their execution's root rides along)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--spans-per-request", type=int, default=512)
    parser.add_argument("--gzip", action="store_true", help="gzip the request bodies (Content-Encoding: gzip)")
    parser.add_argument("--senders", type=int, default=2, help="sender threads, one keep-alive connection each")
    parser.add_argument("--otlp-connections", type=int, default=2, help="roma-otel serve --otlp-connections")
    parser.add_argument("--serve-workers", type=int, default=1, help="roma-otel serve --workers")
    parser.add_argument("--batch-size", type=int, default=500, help="the in-process writer's batch size")
    parser.add_argument("--breakdown-repeats", type=int, default=1, help="passes per phase and round, breakdown")
    parser.add_argument("--demo-executions", type=int, default=16, help="demo runs, decoder comparison (0: none)")
    parser.add_argument("--dsn", help="an empty database (default: a throwaway local cluster)")
    parser.add_argument(
        "--pin", action="store_true", help="this process and serve on the first CPU, Postgres on the last"
    )
    args = parser.parse_args(argv)
    if args.pin and (args.dsn is not None or len(_CPUS) < 2):
        parser.error("--pin needs two CPUs and the benchmark's own cluster (no --dsn)")

    with benchmark_database(args.dsn) as (dsn, server):
        return run(dsn, server, args)


if __name__ == "__main__":
    raise SystemExit(main())

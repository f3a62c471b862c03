"""The writer process (the default Postgres writer) against a real PostgreSQL: rows arrive, a killed
child loses nothing, a shutdown with the database down spools everything, and the child never
instruments itself."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import pytest

from roma_otel.compat.otel import SdkPaths
from roma_otel.compat.otel import paths as sdk_paths
from roma_otel.compat.otel import public_row as _public_snapshot
from roma_otel.exporters.postgres import PostgresSpanProcessor
from roma_otel.exporters.postgres_process import (
    _DIRECT_TYPES,
    _PUBLIC_TYPES,
    PostgresProcessSpanProcessor,
    SpanRecord,
    _child_environment,
    snapshot,
)
from roma_otel.storage.rows import classify, span_attributes, tool_invocation_row
from tests.test_postgres_writer import (  # noqa: F401
    migrated,
    processor_of,
    replay_spool,
    rows,
    run_execution,
    writer_config,
)


def test_instrumentation_writes_through_the_writer_process(make_tel, migrated: str) -> None:  # noqa: F811
    config = writer_config(migrated)
    config.storage.postgres.writer_process = True
    tel = make_tel(config)
    writer = processor_of(tel)
    assert isinstance(writer, PostgresProcessSpanProcessor) and writer.uses_process
    assert writer._proc is not None and writer._proc.pid != os.getpid() and writer._proc.poll() is None
    execution_id = run_execution()
    assert writer.force_flush(20_000)
    assert rows(migrated, "SELECT status FROM executions WHERE execution_id = %s", execution_id) == [("completed",)]
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(2,)]
    assert rows(migrated, "SELECT count(*) FROM tool_invocation_traces") == [(2,)]
    assert writer.written_rows >= 6 and writer.dropped == 0


def test_a_span_record_translates_exactly_like_the_span(tel) -> None:
    run_execution()
    tool = next(s for s in tel.spans() if classify(s) == "tool")
    record = SpanRecord(*snapshot(tool))
    assert classify(record) == "tool"
    assert span_attributes(record) == dict(tool.attributes)
    assert tool_invocation_row(record) == tool_invocation_row(tool)


def test_the_snapshot_reads_the_sdk_span_fields_as_its_properties_give_them(tel) -> None:
    run_execution()
    spans = [s for s in tel.spans() if classify(s)]
    failing = next(s for s in spans if s.status.description)  # the tool that raised: an error and a message
    for span in spans:
        assert snapshot(span) == _public_snapshot(span)
    # Read directly only where compat.otel verified the SDK's fields (not with ROMA_OTEL_SDK_FAST_PATHS=0).
    assert (type(failing) in _DIRECT_TYPES) is sdk_paths().row
    assert snapshot(failing)[6:8] == (2, failing.status.description)
    record = SpanRecord(*snapshot(failing))  # no SDK fields behind its attributes: read through them
    assert snapshot(record) == snapshot(failing) and SpanRecord in _PUBLIC_TYPES


def test_killing_the_writer_process_loses_nothing(tel, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    first = [run_execution(f"before {i}") for i in range(3)]
    cut = len(tel.spans())
    second = [run_execution(f"after {i}") for i in range(3)]
    spans = [s for s in tel.spans() if classify(s)]
    before = [s for s in tel.spans()[:cut] if classify(s)]
    after = [s for s in spans if s not in before]
    writer = PostgresProcessSpanProcessor(migrated, spool_dir=tmp_path, batch_size=4, flush_interval=0.05)
    try:
        assert writer.force_flush(20_000) and writer.uses_process
        for span in before:
            writer.on_end(span)
        assert writer.force_flush(20_000)
        os.kill(writer._proc.pid, signal.SIGKILL)  # the writer dies between flushes
        for span in after:
            writer.on_end(span)
        assert writer.force_flush(30_000)
        assert not writer.uses_process  # the rest went through the in-process writer
    finally:
        writer.shutdown()
    completed = {r[0] for r in rows(migrated, "SELECT execution_id FROM executions WHERE status = 'completed'")}
    assert set(first + second) <= completed
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(12,)]  # each row once
    assert rows(migrated, "SELECT count(*) FROM tool_invocation_traces") == [(12,)]


def test_shutdown_with_the_database_down_spools_everything(tel, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    execution_id = run_execution()
    spans = [s for s in tel.spans() if classify(s)]
    writer = PostgresProcessSpanProcessor("postgresql://nobody@127.0.0.1:1/none", spool_dir=tmp_path, flush_timeout=2)
    for span in spans:
        writer.on_end(span)
    started = time.monotonic()
    writer.shutdown()
    assert time.monotonic() - started < 20  # bounded, even with nothing listening
    assert writer._proc.poll() is not None  # the child is gone
    assert list(tmp_path.glob("batch-*.json"))

    replay_spool(migrated, tmp_path)
    assert rows(migrated, "SELECT status FROM executions WHERE execution_id = %s", execution_id) == [("completed",)]
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(2,)]


def test_the_child_never_instruments_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = os.path.join("site-packages", "opentelemetry", "instrumentation", "auto_instrumentation")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([auto, "/somewhere/else"]))
    env = _child_environment()
    entries = env["PYTHONPATH"].split(os.pathsep)
    assert auto not in entries and "/somewhere/else" in entries
    assert env["OTEL_SDK_DISABLED"] == "true" and env["ROMA_OTEL_WRITER_PROCESS"] == "1"


def test_the_child_process_starts_no_writer_of_its_own(make_tel, migrated: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811,E501
    monkeypatch.setenv("ROMA_OTEL_WRITER_PROCESS", "1")  # as inside the writer process
    config = writer_config(migrated)
    config.storage.postgres.writer_process = True  # what the application asked for: not for the child
    tel = make_tel(config)
    assert type(processor_of(tel)) is PostgresSpanProcessor


def test_after_shutdown_nothing_more_happens(tel, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    run_execution()
    spans = [s for s in tel.spans() if classify(s)]
    writer = PostgresProcessSpanProcessor(migrated, spool_dir=tmp_path)
    for span in spans:
        writer.on_end(span)
    writer.shutdown()
    assert writer._proc.poll() == 0 and writer.uses_process  # the child stopped cleanly, no fallback
    writer.on_end(spans[0])  # ignored
    assert writer.force_flush(1_000) and writer.uses_process and not writer._queue
    writer.shutdown()  # idempotent
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(2,)]


def test_a_burst_in_big_frames_is_written_in_order_across_flushes(tel, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    """Thousands of spans' worth of frames arrive at once; the child decodes them a few batches at a time,
    and each flush still covers everything handed over before it (parents before their children)."""
    waves = [[run_execution(f"wave {w} run {i}") for i in range(8)] for w in range(2)]
    spans = [s for s in tel.spans() if classify(s)]
    half = len(spans) // 2
    cut = next(i for i in range(half, len(spans)) if classify(spans[i - 1]) == "root")  # a wave boundary
    writer = PostgresProcessSpanProcessor(migrated, spool_dir=tmp_path, batch_size=3, flush_interval=5.0)
    try:
        assert writer.force_flush(20_000) and writer.uses_process
        for span in spans[:cut]:
            writer.on_end(span)
        assert writer.force_flush(30_000)
        done = {r[0] for r in rows(migrated, "SELECT execution_id FROM executions WHERE status = 'completed'")}
        assert set(waves[0]) <= done and not set(waves[1]) & done
        assert not writer._unacked  # the child's progress reports (throttled in a backlog) caught up
        for span in spans[cut:]:
            writer.on_end(span)
        assert writer.force_flush(30_000) and writer.uses_process
    finally:
        writer.shutdown()
    done = {r[0] for r in rows(migrated, "SELECT execution_id FROM executions WHERE status = 'completed'")}
    assert set(waves[0] + waves[1]) <= done
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(32,)]
    assert rows(migrated, "SELECT count(*) FROM tool_invocation_traces") == [(32,)]
    assert writer.dropped == 0


def test_a_slow_database_keeps_the_childs_backlog_bounded(tel, migrated: str, tmp_path: Path) -> None:  # noqa: F811
    """When Postgres takes rows slower than they come, the child holds no more than max_queue_size spans
    (plus a frame) and counts what it drops; a shutdown still ends within its timeout, spooling the rest."""
    import psycopg

    for i in range(40):
        run_execution(f"run {i}")
    spans = [s for s in tel.spans() if classify(s)]
    with psycopg.connect(migrated, autocommit=True) as conn:  # every statement on the table takes 50 ms
        conn.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.05); "
            "RETURN NULL; END $$"
        )
        conn.execute("CREATE TRIGGER slow AFTER INSERT ON lm_traces FOR EACH STATEMENT EXECUTE FUNCTION slow()")
    writer = PostgresProcessSpanProcessor(
        migrated, spool_dir=tmp_path, batch_size=2, max_queue_size=60, flush_interval=0.05, flush_timeout=2
    )
    assert writer._wake_at == 30  # the feeder wakes before its own queue could overflow
    try:
        assert writer.force_flush(20_000) and writer.uses_process
        sent = spans * 10  # the same spans again and again: the backlog is what matters here
        for at in range(0, len(sent), 20):  # slowly enough that this process's own queue never fills
            for span in sent[at : at + 20]:
                writer.on_end(span)
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while writer.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.dropped > 0  # counted, from the child's "drop" reports
        time.sleep(0.5)  # the child has read what is in the pipe by now (it reads between transactions)
        with writer._lock:  # sent and not reported done: in the child, or still in the pipe
            unacked = sum(len(pickle.loads(frame)[1]) for _, frame in writer._unacked)
        assert unacked <= 2 * 60 + 100, unacked  # its queue, as much undecoded, a little in the pipe
        started = time.monotonic()
    finally:
        writer.shutdown()
    assert time.monotonic() - started < 20
    assert writer._proc.returncode == 0 and writer.uses_process  # the child stopped by itself, in time


def test_a_forked_child_does_not_connect_until_it_writes(tmp_path: Path) -> None:
    """The writer connects as it starts, but a forked child of the application (a worker pool, a
    pre-forking server) only when it has something to write; after shutdown, a fork starts nothing."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    dsn = f"postgresql://nobody@127.0.0.1:{listener.getsockname()[1]}/none?connect_timeout=2"
    writer = PostgresSpanProcessor(dsn, spool_dir=tmp_path / "thread", flush_timeout=1)
    process_writer = PostgresProcessSpanProcessor(dsn, spool_dir=tmp_path / "process", flush_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while len(accepted) < 2 and time.monotonic() < deadline:  # this writer's thread and the child
            time.sleep(0.02)
        assert len(accepted) == 2
        pid = os.fork()
        if pid == 0:  # the forked child: both writers come back, neither connects
            time.sleep(0.5)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        time.sleep(0.2)
        assert len(accepted) == 2
    finally:
        writer.shutdown()
        process_writer.shutdown()
        listener.close()


def test_snapshot_falls_back_per_span_when_attributes_are_not_the_sdks(tel, monkeypatch) -> None:
    monkeypatch.setattr("roma_otel.exporters.postgres_process.otel_paths", lambda: SdkPaths(True, True, True))
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    class FreshSpan(ReadableSpan):  # a class snapshot() has not classified yet
        pass

    context = SpanContext(1, 2, is_remote=False)
    parent = SpanContext(1, 3, is_remote=True)  # a remote parent, as under a propagated trace
    # A first span with plain-dict attributes cannot show that the direct read agrees: no verdict yet.
    plain = FreshSpan("p", context=context, parent=parent, attributes={"k": 0}, start_time=1, end_time=2)  # type: ignore[arg-type]
    assert snapshot(plain) == _public_snapshot(plain)
    assert FreshSpan not in _DIRECT_TYPES and FreshSpan not in _PUBLIC_TYPES
    root_attributes = BoundedAttributes(attributes={"k": 0})
    root = FreshSpan("r", context=context, attributes=root_attributes, start_time=1, end_time=2)
    assert snapshot(root) == _public_snapshot(root) and FreshSpan in _DIRECT_TYPES
    assert snapshot(root)[3] is None and snapshot(root)[-1] is root_attributes._dict
    bounded = BoundedAttributes(attributes={"k": 1})
    child = FreshSpan("a", context=context, parent=parent, attributes=bounded, start_time=1, end_time=2)
    assert snapshot(child) == _public_snapshot(child)
    assert snapshot(child)[3] == 3 and snapshot(child)[-1] is bounded._dict
    for attributes in ({"k": 2}, None):  # the same class, built with a plain dict or no attributes
        for span_parent in (parent, None):
            span = FreshSpan("b", context=context, parent=span_parent, attributes=attributes, start_time=1, end_time=2)  # type: ignore[arg-type]
            assert snapshot(span) == _public_snapshot(span)

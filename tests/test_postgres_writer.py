"""The Postgres writer against a real PostgreSQL: rows from spans, idempotence, outages, shutdown."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dspy
import psycopg
import pytest

import roma_otel
from roma_otel import semconv as sc
from roma_otel.config import default_config
from roma_otel.exporters.postgres import PostgresSpanProcessor
from roma_otel.storage.migrate import upgrade
from roma_otel.storage.rows import LM, TOOL, classify, to_batch
from tests.conftest import answer_lm
from tests.pgserver import own_migrated_server, wait_ready


@roma_otel.toolkit
class Weather:
    def forecast(self, city: str) -> str:
        return f"sunny in {city}"

    def broken(self, city: str) -> str:
        raise ConnectionError(f"no station in {city}")


class Planner(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> answer")

    def forward(self, question: str) -> Any:
        return self.plan(question=question)


def run_execution(goal: str = "weekend in Rome") -> str:
    """One explicit execution: 2 LM calls, 2 tool calls (one failing), a task and two lifecycle events."""
    with dspy.context(lm=answer_lm(answer="ok")), roma_otel.execution(goal, max_depth=2, solver_type="Demo") as ctx:
        with roma_otel.task("plan it", depth=1):
            Planner()(question="a")
            Planner()(question="b")
            Weather().forecast("Rome")
            with pytest.raises(ConnectionError):
                Weather().broken("Atlantis")
        roma_otel.record_toolkit_event("cache_miss", "Weather", duration_ms=0.1)
        roma_otel.record_toolkit_event("create", "Weather", duration_ms=2.5)
    return ctx.execution_id


def rows(dsn: str, sql: str, *params: Any) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def writer_config(dsn: str, **toolkit: Any) -> Any:
    config = default_config()
    config.storage.postgres.enabled = True
    config.storage.postgres.connection_url = dsn
    for key, value in toolkit.items():
        setattr(config.observability.toolkit_metrics, key, value)
    return config


def processor_of(tel: Any) -> PostgresSpanProcessor:
    return tel.instrumentor._postgres


def replay_spool(dsn: str, spool: Path) -> None:
    """Replay a spool directory with a fresh writer until it is empty (or 20 s pass)."""
    replay = PostgresSpanProcessor(dsn, spool_dir=spool)
    try:
        assert replay.force_flush(20_000)
        deadline = time.monotonic() + 20
        while list(spool.glob("batch-*.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
            replay.force_flush(2_000)
    finally:
        replay.shutdown()
    assert list(spool.glob("batch-*.json")) == []


@pytest.fixture
def migrated(pg_dsn: str) -> str:
    upgrade(pg_dsn)
    return pg_dsn


def test_rows_are_translated_from_spans(tel) -> None:
    execution_id = run_execution()
    spans = [(classify(s), s) for s in tel.spans()]
    kinds = [k for k, _ in spans]
    assert kinds.count(LM) == 2 and kinds.count(TOOL) == 2
    batch = to_batch([(k, s) for k, s in spans if k], {})
    assert set(batch.executions) == {execution_id}
    lm = batch.lm[0]
    assert lm["module_name"] == "planner" and lm["model"] == "openai/gpt-4o-mini"
    assert (lm["prompt_tokens"], lm["completion_tokens"], lm["total_tokens"]) == (10, 20, 30)
    assert lm["cost_usd"] > 0 and lm["depth"] == 1 and lm["task_id"]
    failed = next(r for r in batch.tools if not r["success"])
    assert failed["metadata"]["error_type"] == "ConnectionError"
    assert 0 < failed["invoked_at_ns"] < time.time_ns()
    (final,) = batch.finals
    assert final["task"] == "weekend in Rome" and final["solver_type"] == "Demo" and final["status"] == "completed"
    kinds_in_tree = {n["kind"] for n in final["dag_snapshot"]}
    assert kinds_in_tree == {"execution", "task", "module"}


def test_execution_is_persisted_end_to_end(make_tel, migrated: str) -> None:
    tel = make_tel(writer_config(migrated))
    execution_id = run_execution()
    assert processor_of(tel).force_flush(20_000)

    (execution,) = rows(
        migrated,
        "SELECT status, task, max_depth, solver_type, total_tasks, completed_tasks, total_tokens, total_cost, "
        "otel_trace_id, jsonb_array_length(dag_snapshot) FROM executions WHERE execution_id = %s",
        execution_id,
    )
    status, task, max_depth, solver, total_tasks, completed, tokens, cost, trace_id, nodes = execution
    assert (status, task, max_depth, solver, total_tasks, completed, tokens) == (
        "completed", "weekend in Rome", 2, "Demo", 1, 1, 60,
    )  # fmt: skip
    root = tel.span(sc.SPAN_EXECUTION)
    assert trace_id == f"{root.context.trace_id:032x}"
    assert cost == pytest.approx(root.attributes[sc.EXECUTION_TOTAL_COST])
    assert nodes >= 4  # execution, task, two Planner spans (+ their Predicts)

    lm = rows(
        migrated,
        "SELECT module_name, prompt_tokens, completion_tokens, cost_usd FROM lm_traces WHERE execution_id=%s",
        execution_id,
    )
    assert len(lm) == 2 and all(r[0] == "planner" and r[1] == 10 and r[2] == 20 and r[3] > 0 for r in lm)
    tools = rows(
        migrated,
        "SELECT tool_name, success, metadata->>'error_type', input_size_bytes FROM tool_invocation_traces "
        "WHERE execution_id=%s ORDER BY invoked_at",
        execution_id,
    )
    assert tools == [("forecast", True, None, 4), ("broken", False, "ConnectionError", 8)]
    ops = rows(migrated, "SELECT operation FROM toolkit_traces WHERE execution_id=%s ORDER BY trace_id", execution_id)
    assert [o for (o,) in ops] == ["cache_miss", "create"]


def test_a_retried_batch_never_duplicates(tel, migrated: str, tmp_path: Path) -> None:
    run_execution()
    spans = [(classify(s), s) for s in tel.spans() if classify(s)]
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path)
    try:
        writer._write(to_batch(spans, {}))
        writer._write(to_batch(spans, {}))  # the same spans again, as after a retry
    finally:
        writer.shutdown()
    counts = rows(
        migrated,
        "SELECT (SELECT count(*) FROM lm_traces), (SELECT count(*) FROM tool_invocation_traces), "
        "(SELECT count(*) FROM toolkit_traces), (SELECT count(*) FROM executions)",
    )
    assert counts == [(2, 2, 2, 1)]


def test_synchronous_persist_writes_when_the_execution_ends(make_tel, migrated: str) -> None:
    tel = make_tel(writer_config(migrated, async_persist=False, batch_size=10_000))
    processor_of(tel).flush_interval = 3600  # the worker would not wake on its own during this test
    execution_id = run_execution()
    assert rows(migrated, "SELECT status FROM executions WHERE execution_id=%s", execution_id) == [("completed",)]
    assert rows(migrated, "SELECT count(*) FROM lm_traces")[0][0] == 2


def test_persist_to_db_false_keeps_toolkit_rows_out(make_tel, migrated: str) -> None:
    tel = make_tel(writer_config(migrated, persist_to_db=False))
    run_execution()
    assert processor_of(tel).force_flush(20_000)
    assert rows(migrated, "SELECT count(*) FROM tool_invocation_traces")[0][0] == 0
    assert rows(migrated, "SELECT count(*) FROM lm_traces")[0][0] == 2


def test_server_outage_spools_and_replays_in_order(make_tel, tmp_path: Path) -> None:
    with own_migrated_server() as server:
        config = writer_config(server.dsn)
        config.storage.postgres.writer_process = False  # the writer engine itself (the process runs the same)
        tel = make_tel(config)
        writer = processor_of(tel)
        writer.spool_dir = tmp_path
        first = run_execution("before the outage")
        assert writer.force_flush(20_000)

        server.halt()  # the database goes away mid-run
        during = [run_execution(f"during the outage {i}") for i in range(3)]
        assert writer.force_flush(30_000)
        spooled = sorted(tmp_path.glob("batch-*.json"))
        assert spooled, "rows written during the outage must be spooled"

        server.resume()
        wait_ready(server.dsn)
        writer._retry_at = 0.0
        deadline = time.monotonic() + 30
        while list(tmp_path.glob("batch-*.json")) and time.monotonic() < deadline:
            writer.force_flush(5_000)
            time.sleep(0.2)
        assert list(tmp_path.glob("batch-*.json")) == []
        persisted = {r[0] for r in rows(server.dsn, "SELECT execution_id FROM executions WHERE status = 'completed'")}
        assert {first, *during} <= persisted
        assert rows(server.dsn, "SELECT count(*) FROM lm_traces")[0][0] == 2 * 4
        assert writer.dropped == 0


def test_clean_shutdown_with_the_database_down_loses_nothing(tel, tmp_path: Path, migrated: str) -> None:
    run_execution()
    spans = [(classify(s), s) for s in tel.spans() if classify(s)]
    writer = PostgresSpanProcessor("postgresql://nobody@127.0.0.1:1/none", spool_dir=tmp_path, flush_timeout=2)
    for _, span in spans:
        writer.on_end(span)
    started = time.monotonic()
    writer.shutdown()
    assert time.monotonic() - started < 15  # bounded, even with nothing listening
    assert list(tmp_path.glob("batch-*.json"))

    replay_spool(migrated, tmp_path)
    assert rows(migrated, "SELECT count(*) FROM lm_traces")[0][0] == 2
    assert rows(migrated, "SELECT status FROM executions")[0][0] == "completed"


def test_a_full_queue_drops_oldest_and_counts(tel, tmp_path: Path) -> None:
    run_execution()
    spans = [s for s in tel.spans() if classify(s)]
    dropped: list[tuple[int, str]] = []
    writer = PostgresSpanProcessor(
        "postgresql://nobody@127.0.0.1:1/none", spool_dir=tmp_path, max_queue_size=2, flush_interval=3600,
        on_drop=lambda n, reason: dropped.append((n, reason)),
    )  # fmt: skip
    # The worker stays asleep: flush_interval is an hour, and a queue bound of 2 never reaches the batch size
    # that would wake it.
    try:
        for span in spans:
            writer.on_end(span)
        assert writer.dropped == len(spans) - 2
        assert sum(n for n, _ in dropped) == len(spans) - 2 and {r for _, r in dropped} == {"queue full"}
    finally:
        writer.flush_timeout = 1
        writer.shutdown()


def test_spans_ending_on_many_threads_at_once_are_queued_once_each_within_the_bound(tel, tmp_path: Path) -> None:
    """on_end takes no lock: spans ended by several threads while a consumer takes them off the queue
    must each be taken or queued exactly once, a full queue must stay within its bound (plus at most
    one span per racing thread), and every span it lets go must be counted. (Races between threads are
    rare even at the shortest switch interval: this guards the accounting more than the locking.)"""
    run_execution()
    scope = next(s for s in tel.spans() if classify(s)).instrumentation_scope
    threads_n, per_thread = 4, 3000  # four producers
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can, to provoke the races
    try:
        for bound in (1_000_000, 50):
            # Distinct objects, kept alive, so that "once each" can be checked by identity.
            spans = [
                [SimpleNamespace(_instrumentation_scope=scope, instrumentation_scope=scope) for _ in range(per_thread)]
                for _ in range(4)
            ]
            writer = PostgresSpanProcessor(
                "postgresql://nobody@127.0.0.1:1/none", spool_dir=tmp_path, max_queue_size=bound,
                flush_interval=3600, connect_early=False,
            )  # fmt: skip
            writer._wake_at = 10**9  # with flush_interval, keeps the worker asleep: this test is the consumer
            start = threading.Barrier(threads_n + 1)
            ended = threading.Event()
            taken: list[Any] = []

            def end_all(mine: list[Any], start: threading.Barrier = start, writer: Any = writer) -> None:
                start.wait()
                for span in mine:
                    writer.on_end(span)

            def consume(
                start: threading.Barrier = start, writer: Any = writer, ended: Any = ended, taken: Any = taken
            ) -> None:
                start.wait()
                while not ended.is_set():
                    taken.extend(writer._take(7))

            producers = [threading.Thread(target=end_all, args=(mine,)) for mine in spans]
            consumer = threading.Thread(target=consume)
            try:
                for t in [*producers, consumer]:
                    t.start()
                for t in producers:
                    t.join()
                ended.set()
                consumer.join()
                queued = list(writer._queue)
                total = threads_n * per_thread
                seen = {id(s) for s in taken} | {id(s) for s in queued}
                assert len(seen) == len(taken) + len(queued), "a span was queued or taken twice"
                assert len(taken) + len(queued) + writer.dropped == total
                assert writer.disposed == writer.dropped
                if bound > total:
                    assert writer.dropped == 0
                else:
                    assert writer.dropped > 0 and len(queued) <= bound + threads_n
            finally:
                writer._queue.clear()
                writer._done(len(taken))
                writer.flush_timeout = 0.1
                writer.shutdown()
    finally:
        sys.setswitchinterval(switch)


def test_copy_fast_path_and_on_conflict_path_write_identical_rows(tel, migrated: str, tmp_path: Path) -> None:
    """The two ways a batch reaches the tables (COPY; INSERT .. ON CONFLICT for retries) must agree on
    every column, including NULLs, text escaping, timestamps and JSON metadata."""
    execution_id = run_execution()
    with roma_otel.execution("escapes"), pytest.raises(ConnectionError):
        Weather().broken('tab\there, newline\nthere, back\\slash, quote "q", naïve')
    spans = [(classify(s), s) for s in tel.spans() if classify(s)]
    columns = {
        "lm_traces": "execution_id, otel_trace_id, span_id, parent_span_id, task_id, depth, module_name, model, "
        "created_at, prompt_tokens, completion_tokens, total_tokens, cost_usd, cost_source, latency_ms, cache_hit, "
        "error, metadata",
        "tool_invocation_traces": "execution_id, toolkit_class, tool_name, invoked_at, duration_ms, input_size_bytes, "
        "output_size_bytes, success, error, metadata",
        "toolkit_traces": "execution_id, timestamp, operation, toolkit_class, duration_ms, success, error, metadata",
    }

    def snapshot() -> dict[str, list[tuple]]:
        return {t: sorted(rows(migrated, f"SELECT {c} FROM {t}"), key=repr) for t, c in columns.items()}

    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path)
    try:
        writer._write_once(to_batch(spans, {}), fast=True)
        by_copy = snapshot()
        with psycopg.connect(migrated, autocommit=True) as conn:
            conn.execute("TRUNCATE executions CASCADE")
        writer._write_once(to_batch(spans, {}), fast=False)
        by_insert = snapshot()
    finally:
        writer.shutdown()
    for table in columns:
        for a, b in zip(by_copy[table], by_insert[table], strict=True):
            assert a == b, (table, [(i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y])
    assert len(by_copy["lm_traces"]) == 2 and len(by_copy["tool_invocation_traces"]) == 3
    errors = [r[8] for r in by_copy["tool_invocation_traces"] if r[8]]
    assert any("naïve" in e and "\t" in e and "\n" in e and "\\" in e for e in errors), errors
    assert execution_id in {r[0] for r in by_copy["lm_traces"]}


def test_transactions_under_a_backlog_write_every_row_once(tel, migrated: str, tmp_path: Path) -> None:
    """A backlog goes out in several transactions of batch_size, each translated and formatted while
    Postgres finishes the one before (see ``_drain``): every row must arrive, and none twice."""
    ids = [run_execution(f"backlog {i}") for i in range(6)]
    spans = [s for s in tel.spans() if classify(s)]
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path, batch_size=5, flush_interval=3600)
    try:
        for span in spans:  # all queued before the worker wakes: a backlog of several transactions
            writer.on_end(span)
        assert writer.force_flush(20_000)
    finally:
        writer.shutdown()
    assert rows(migrated, "SELECT count(*), count(DISTINCT execution_id) FROM lm_traces") == [(12, 6)]
    assert rows(migrated, "SELECT count(*) FROM tool_invocation_traces") == [(12,)]
    assert rows(migrated, "SELECT count(*) FROM toolkit_traces") == [(12,)]
    statuses = rows(migrated, "SELECT execution_id, status FROM executions ORDER BY execution_id")
    assert statuses == sorted((i, "completed") for i in ids)
    assert writer.dropped == 0 and list(tmp_path.glob("batch-*.json")) == []


def test_a_translation_failure_is_counted_and_the_writer_goes_on(
    tel, migrated: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_execution("first")
    spans = [s for s in tel.spans() if classify(s)]
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path, flush_interval=3600)
    original = writer._translate
    calls = {"n": 0}

    def flaky(items: list) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("translation bug")
        return original(items)

    monkeypatch.setattr(writer, "_translate", flaky)
    try:
        for span in spans:
            writer.on_end(span)
        assert writer.force_flush(20_000)
        assert writer.dropped == len(spans)  # counted, not silently lost
        for span in spans:  # the same spans again: the writer still works
            writer.on_end(span)
        assert writer.force_flush(20_000)
    finally:
        writer.shutdown()
    assert rows(migrated, "SELECT status FROM executions WHERE execution_id = %s", first) == [("completed",)]
    assert rows(migrated, "SELECT count(*) FROM lm_traces") == [(2,)]


def test_tool_rows_formatted_straight_from_spans_match_the_row_translation(tel) -> None:
    """Tool invocation spans skip the row dict on the COPY path (``_tool_span_line``); every kind of tool
    span must give exactly the text the row translation gives, also as the writer process's records."""
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from roma_otel.exporters.postgres import _tool_line, _tool_span_line
    from roma_otel.exporters.postgres_process import SpanRecord, snapshot
    from roma_otel.storage.rows import span_attributes, tool_invocation_row

    run_execution()
    with roma_otel.execution("escapes"), pytest.raises(ConnectionError):
        Weather().broken('tab\there, newline\nthere, back\\slash, quote "q", naïve')
    with roma_otel.execution("tasks"), roma_otel.task("in a task", task_id="t-1"):
        Weather().forecast("Oslo")  # a tool call with a task id
    # A tool span made by hand, with none of the optional attributes: duration from the span's times,
    # success from its status.
    bare = tel.tracer_provider.get_tracer("roma_otel").start_span(
        "execute_tool bare", kind=SpanKind.INTERNAL, attributes={sc.EXECUTION_ID: "e\tx", sc.TOOLKIT_CLASS: "K\\1"}
    )
    bare.set_status(Status(StatusCode.ERROR))
    bare.end()
    # Values that are equal as keys but print differently (1, 1.0, True) must not share a cached prefix.
    odd = []
    for toolkit in (1, 1.0, True):
        made = tel.tracer_provider.get_tracer("roma_otel").start_span(
            "execute_tool odd", attributes={sc.EXECUTION_ID: "e", sc.TOOLKIT_CLASS: toolkit, sc.GEN_AI_TOOL_NAME: "t"}
        )
        made.end()
        odd.append(made)
    spans = [s for s in tel.spans() if classify(s) == TOOL and s.name != "execute_tool odd"] + [bare] + odd
    assert len(spans) == 8
    records = [SpanRecord(*snapshot(s)) for s in spans]
    for span in spans + records:
        attrs = span_attributes(span)
        assert _tool_span_line(span, attrs) == _tool_line(tool_invocation_row(span, attrs)), span.name
    lines = [_tool_span_line(s, span_attributes(s)) for s in spans[:5]]
    assert sum("\\N" not in line.split("\t")[8] for line in lines) == 3  # three failures carry an error text
    assert '"task_id":"t-1"' in lines[-2] and "e\\tx\tK\\\\1\t" in lines[-1]
    assert [_tool_span_line(s, span_attributes(s)).split("\t")[1] for s in odd] == ["1", "1.0", "True"]
    # Metadata text is cached per (module, depth) around the ids: modules that need escaping, one named
    # like the cache's marks, non-str modules, bool and int depths, and the same key twice (a cache hit).
    modules = ['mod "q"\tx\\y', 'mod "q"\tx\\y', "@@roma-otel-trace@@", 5, None, "plain", "plain"]
    depths = [2, 2, 0, 1, 3, True, 1]
    made = []
    for module, depth in zip(modules, depths, strict=True):
        attributes = {sc.EXECUTION_ID: "e", sc.TOOLKIT_CLASS: "K", sc.GEN_AI_TOOL_NAME: "t", sc.TASK_DEPTH: depth}
        if module is not None:
            attributes[sc.MODULE] = module
        span = tel.tracer_provider.get_tracer("roma_otel").start_span("execute_tool meta", attributes=attributes)
        span.end()
        made.append(span)
    for span in made + [SpanRecord(*snapshot(s)) for s in made]:
        attrs = span_attributes(span)
        assert _tool_span_line(span, attrs) == _tool_line(tool_invocation_row(span, attrs)), attrs
    metadata = [json.loads(_tool_span_line(s, span_attributes(s)).split("\t")[9].replace("\\\\", "\\")) for s in made]
    assert [(m.get("module"), m["depth"]) for m in metadata] == list(zip(modules, depths, strict=True))
    assert len({m["span_id"] for m in metadata}) == len(made)  # each row its own ids, cache hit or not


def test_an_execution_row_deleted_mid_run_is_recreated_and_nothing_is_lost(tel, migrated: str, tmp_path: Path) -> None:
    """The writer skips the first-seen insert for executions it already committed; if such a row is gone
    (deleted while the run goes on), the next batch still lands, with its execution row back."""
    run_execution()
    spans = [(classify(s), s) for s in tel.spans() if classify(s) in (LM, TOOL)]
    (execution_id,) = {str(s.attributes[sc.EXECUTION_ID]) for _, s in spans}
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path)
    try:
        writer._write(to_batch(spans[:2], {}))
        assert execution_id in writer._known_executions
        with psycopg.connect(migrated, autocommit=True) as conn:
            conn.execute("DELETE FROM executions WHERE execution_id = %s", (execution_id,))
        writer._write(to_batch(spans[2:], {}))
    finally:
        writer.shutdown()
    (count,) = rows(migrated, "SELECT count(*) FROM executions WHERE execution_id = %s", execution_id)[0:1]
    assert count == (1,)
    landed = rows(migrated, "SELECT count(*) FROM lm_traces")[0][0] + rows(
        migrated, "SELECT count(*) FROM tool_invocation_traces"
    )[0][0]
    assert landed == len(spans) - 2  # the first two went with the deleted execution (ON DELETE CASCADE)

"""An execution's tree (``executions.dag_snapshot``) is merged in the database, so spans that arrive in
pieces, out of order, twice, or at different writers give the row one writer makes from all of them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

import roma_otel
from roma_otel.exporters.postgres import PostgresSpanProcessor
from roma_otel.storage.rows import ROOT, classify, standalone_batch, to_batch
from tests.test_postgres_writer import migrated, rows, run_execution  # noqa: F401 (fixture)

_COLUMNS = (
    "execution_id, created_at, status, task, max_depth, solver_type, total_tasks, completed_tasks, failed_tasks, "
    "total_cost, total_tokens, execution_duration, max_depth_reached, otel_trace_id, metadata, dag_snapshot"
)
_CHILDREN = {
    "lm_traces": "otel_trace_id, span_id, parent_span_id, created_at, prompt_tokens, cost_usd, latency_ms",
    "tool_invocation_traces": "tool_name, invoked_at, duration_ms, success, error, metadata",
    "toolkit_traces": "operation, timestamp, duration_ms, metadata",
}


def stored(dsn: str) -> dict[str, Any]:
    """Every execution row and child row, in a comparable order."""
    out: dict[str, Any] = {"executions": rows(dsn, f"SELECT {_COLUMNS} FROM executions ORDER BY execution_id")}
    for table, columns in _CHILDREN.items():
        out[table] = sorted(rows(dsn, f"SELECT {columns} FROM {table}"), key=repr)
    return out


def reset(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE executions CASCADE")


@pytest.fixture
def spans(tel: Any) -> list[Any]:
    run_execution("first")
    with roma_otel.execution("second", max_depth=1), roma_otel.task("only step", depth=1):
        pass
    return [s for s in tel.spans() if classify(s)]


@pytest.fixture
def reference(spans: list[Any], migrated: str, tmp_path: Path) -> dict[str, Any]:  # noqa: F811
    """The rows one in-process writer stores from all the spans, in end order, in one batch."""
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path / "ref", threaded=False)
    try:
        writer.write(to_batch([(classify(s), s) for s in spans], {}))
    finally:
        writer.shutdown()
    ref = stored(migrated)
    reset(migrated)
    trees = [r[-1] for r in ref["executions"]]
    assert sorted(len(t) for t in trees) == [2, 6], trees  # root, task, 2 Planner calls and their 2 Predicts
    return ref


def write_requests(dsn: str, requests: list[list[Any]], writers: list[PostgresSpanProcessor]) -> None:
    for i, request in enumerate(requests):
        writers[i % len(writers)].write(standalone_batch(request))


def test_spans_in_separate_requests_root_first_give_the_same_rows(
    spans: list[Any], reference: dict[str, Any], migrated: str, tmp_path: Path  # noqa: F811
) -> None:
    roots = [s for s in spans if classify(s) == ROOT]
    others = [s for s in spans if classify(s) != ROOT]
    writer = PostgresSpanProcessor(migrated, spool_dir=tmp_path, threaded=False)
    try:
        write_requests(migrated, [roots, others[: len(others) // 2], others[len(others) // 2 :]], [writer])
        assert stored(migrated) == reference
        write_requests(migrated, [roots[:1]], [writer])  # the root again, alone (a retry after a lost answer)
        write_requests(migrated, [others], [writer])  # everything else again
        assert stored(migrated) == reference
    finally:
        writer.shutdown()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spans_shuffled_over_two_writers_give_the_same_rows(
    spans: list[Any], reference: dict[str, Any], migrated: str, tmp_path: Path, seed: int  # noqa: F811
) -> None:
    shuffled = list(spans)
    random.Random(seed).shuffle(shuffled)
    requests = [shuffled[i : i + 3] for i in range(0, len(shuffled), 3)]
    writers = [PostgresSpanProcessor(migrated, spool_dir=tmp_path / str(i), threaded=False) for i in range(2)]
    try:
        write_requests(migrated, requests + requests[::2], writers)  # and every other request twice
    finally:
        for writer in writers:
            writer.shutdown()
    assert stored(migrated) == reference


def test_nodes_pending_at_shutdown_are_spooled_and_merged_later(
    spans: list[Any], reference: dict[str, Any], migrated: str, tmp_path: Path  # noqa: F811
) -> None:
    """An in-process writer keeps tree nodes until their root ends; stopped before that, it spools them
    (they used to be lost), and the writer that gets the root completes the same tree."""
    roots = [s for s in spans if classify(s) == ROOT]
    others = [s for s in spans if classify(s) != ROOT]
    first = PostgresSpanProcessor(migrated, spool_dir=tmp_path, threaded=False)
    first.enqueue(others)
    first.force_flush(10_000)
    assert first._nodes  # waiting for their roots
    first.shutdown()
    assert list(tmp_path.glob("batch-*.json"))
    second = PostgresSpanProcessor(migrated, spool_dir=tmp_path, threaded=False)
    try:
        second.enqueue(roots)
        assert second.force_flush(10_000)
    finally:
        second.shutdown()
    assert not list(tmp_path.glob("batch-*.json"))
    assert stored(migrated) == reference

"""``POST /v1/traces`` over real HTTP (uvicorn) into a real PostgreSQL, sent by the SDK's own OTLP exporter.

The rows must be exactly those the in-process writer stores from the same spans; every bad request gets
its documented answer, writes nothing, and leaves the server serving.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import roma_otel
from roma_otel.api import OtlpSettings, create_app
from roma_otel.exporters.postgres import PostgresSpanProcessor
from roma_otel.storage.migrate import upgrade
from roma_otel.storage.rows import classify
from tests.pgserver import own_migrated_server
from tests.test_api import serve
from tests.test_postgres_writer import run_execution

PROTOBUF = {"Content-Type": "application/x-protobuf"}
# Every column but the generated ones (BIGSERIAL ids, updated_at).
TABLE_COLUMNS = {
    "executions": "execution_id, created_at, status, task, max_depth, solver_type, config_version, total_tasks, "
    "completed_tasks, failed_tasks, total_cost, total_tokens, execution_duration, max_depth_reached, otel_trace_id, "
    "config, metadata, dag_snapshot",
    "lm_traces": "execution_id, otel_trace_id, span_id, parent_span_id, task_id, depth, module_name, model, "
    "created_at, prompt_tokens, completion_tokens, total_tokens, cost_usd, cost_source, latency_ms, cache_hit, error, "
    "metadata",
    "tool_invocation_traces": "execution_id, toolkit_class, tool_name, invoked_at, duration_ms, input_size_bytes, "
    "output_size_bytes, success, error, metadata",
    "toolkit_traces": "execution_id, timestamp, operation, toolkit_class, duration_ms, success, error, metadata",
}


def table_rows(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {t: sorted(conn.execute(f"SELECT {c} FROM {t}").fetchall(), key=repr) for t, c in TABLE_COLUMNS.items()}


def counts(dsn: str) -> dict[str, int]:
    return {table: len(found) for table, found in table_rows(dsn).items()}


def second_database(pg_dsn: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = make_conninfo(**{**conninfo_to_dict(pg_dsn), "dbname": name})
    upgrade(dsn)
    return dsn


@pytest.fixture
def spans(tel: Any) -> list[Any]:
    """Finished roma-otel spans of two executions: LM calls, tool calls (one failing), a task, lifecycle events."""
    run_execution("weekend in Rome")
    run_execution("week in Lisbon")
    found = tel.spans()
    assert sum(1 for s in found if classify(s)) > 10
    return found


@pytest.fixture
def reference(spans: list[Any], pg_dsn: str, tmp_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the in-process writer stores from ``spans``."""
    dsn = second_database(pg_dsn, pg_dsn.rsplit("dbname=", 1)[1].split()[0] + "_ref")
    writer = PostgresSpanProcessor(dsn, spool_dir=tmp_path / "ref", threaded=False)
    writer.enqueue([s for s in spans if s.instrumentation_scope.name == "roma_otel"])
    assert writer.force_flush(30_000)
    writer.shutdown()
    found = table_rows(dsn)
    assert all(found.values()), {t: len(r) for t, r in found.items()}
    return found


@pytest.fixture
def receiver(pg_dsn: str) -> Iterator[str]:
    upgrade(pg_dsn)
    with serve(create_app(pg_dsn)) as base:
        yield base


def post(base: str, body: bytes, headers: dict[str, str], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/traces", content=body, headers=headers, timeout=30, **kwargs)


def exporter(base: str, **kwargs: Any) -> OTLPSpanExporter:
    return OTLPSpanExporter(endpoint=f"{base}/v1/traces", **kwargs)


# --- the same rows --------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["none", "gzip", "deflate"])
def test_sdk_exporter_gives_the_in_process_writers_rows(
    spans: list[Any], reference: dict[str, Any], receiver: str, pg_dsn: str, compression: str
) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression

    sender = exporter(receiver, compression={"none": Compression.NoCompression, "gzip": Compression.Gzip,
                                             "deflate": Compression.Deflate}[compression])  # fmt: skip
    # In pieces, children after their roots for one execution: the tree is merged whatever the order.
    assert sender.export(spans[::-1][:7]) is SpanExportResult.SUCCESS
    assert sender.export(spans[::-1][7:]) is SpanExportResult.SUCCESS
    assert table_rows(pg_dsn) == reference
    assert sender.export(spans) is SpanExportResult.SUCCESS  # a retry of everything: no doubled rows
    assert table_rows(pg_dsn) == reference


def test_otlp_json_gives_the_same_rows_and_answers_in_json(
    spans: list[Any], reference: dict[str, Any], receiver: str, pg_dsn: str
) -> None:
    from google.protobuf import json_format

    request = json_format.MessageToDict(encode_spans(spans))
    for resource in request["resourceSpans"]:  # OTLP/JSON ids are hex, not protobuf JSON's base64
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        import base64

                        span[key] = base64.b64decode(span[key]).hex().upper()
    response = post(receiver, json.dumps(request).encode(), {"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}
    assert table_rows(pg_dsn) == reference


# --- partial success and what is skipped ----------------------------------------------------------
def foreign_spans() -> list[Any]:
    """Spans of another instrumentation scope, with roma-otel's attribute names on them even."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("someone.else")
    with tracer.start_as_current_span("roma.execution", attributes={"roma.execution.id": "foreign"}):
        tracer.start_span("child").end()
    return list(memory.get_finished_spans())


def test_foreign_and_unattributed_spans_write_nothing_and_are_not_rejected(
    tel: Any, receiver: str, pg_dsn: str
) -> None:
    # roma-otel's own span without an execution: no row (as in the in-process writer).
    with roma_otel.task("outside any execution"):
        pass
    ours = tel.spans()
    assert ours and not any(classify(s) for s in ours)
    response = post(receiver, encode_spans(foreign_spans() + ours).SerializeToString(), PROTOBUF)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(response.content).HasField("partial_success")
    assert counts(pg_dsn) == dict.fromkeys(TABLE_COLUMNS, 0)


def test_invalid_spans_are_rejected_as_partial_success_and_the_rest_is_written(
    spans: list[Any], reference: dict[str, Any], receiver: str, pg_dsn: str
) -> None:
    request = encode_spans(spans)
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(request.resource_spans[0].scope_spans[0].spans[0])
    bad.span_id = b"\x01\x02\x03"  # 3 bytes: not a span id
    worse = request.resource_spans[0].scope_spans[0].spans.add()
    worse.CopyFrom(bad)
    worse.span_id = b"\x00" * 8
    response = post(receiver, request.SerializeToString(), PROTOBUF)
    assert response.status_code == 200
    partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_spans == 2 and "span" in partial.error_message.lower(), partial
    assert table_rows(pg_dsn) == reference
    ours = sum(1 for s in spans if s.instrumentation_scope.name == "roma_otel")
    assert httpx.get(f"{receiver}/health").json()["otlp"] == {
        "accepted_spans": ours, "rejected_spans": 2, "in_flight_spans": 0
    }


# --- bad requests -----------------------------------------------------------------------------------
def test_bad_requests_get_clear_answers_write_nothing_and_the_server_keeps_serving(
    spans: list[Any], pg_dsn: str
) -> None:
    upgrade(pg_dsn)
    limit = 64 * 1024
    good = encode_spans(spans).SerializeToString()
    assert len(good) < limit
    with serve(create_app(pg_dsn, otlp=OtlpSettings(max_body_bytes=limit))) as base:
        cases = [
            (b"\xff\x00garbage\x13\x37" * 10, PROTOBUF, 400, "protobuf"),
            (b"{not json", {"Content-Type": "application/json"}, 400, "json"),
            (b'{"resourceSpans": 7}', {"Content-Type": "application/json"}, 400, "resourcespans"),
            (good, {"Content-Type": "text/plain"}, 415, "content-type"),
            (good, {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, 415, "content-encoding"),
            (b"\x1f\x8b\x08\x00broken", {**PROTOBUF, "Content-Encoding": "gzip"}, 400, "gzip"),
            (b"\x00" * (limit + 1), PROTOBUF, 413, "limit"),
            # A gzip bomb: 128 KiB on the wire, 128 MiB inflated; refused at the limit, not inflated whole.
            (gzip.compress(b"\x00" * (128 << 20)), {**PROTOBUF, "Content-Encoding": "gzip"}, 413, "limit"),
            (zlib.compress(b"\x00" * (limit * 4)), {**PROTOBUF, "Content-Encoding": "deflate"}, 413, "limit"),
        ]
        for body, headers, status, word in cases:
            response = post(base, body, headers)
            assert response.status_code == status, (word, response.status_code, response.text)
            media = headers["Content-Type"].split(";")[0]
            if media == "application/json" or (status == 415 and media not in PROTOBUF.values()):
                message = response.json()["message"]
            else:
                from google.rpc.status_pb2 import Status

                message = Status.FromString(response.content).message
            assert word in message.lower(), (word, message)
            assert counts(pg_dsn) == dict.fromkeys(TABLE_COLUMNS, 0), word
        # A body sent without a length (chunked), over the limit: cut off while it streams in.
        chunks = iter([b"\x00" * 40_000] * 3)
        response = httpx.post(f"{base}/v1/traces", content=chunks, headers=PROTOBUF, timeout=30)
        assert response.status_code == 413
        assert post(base, good, PROTOBUF).status_code == 200  # still serving
        assert counts(pg_dsn)["lm_traces"] == 4


def test_a_token_is_required_when_configured(spans: list[Any], pg_dsn: str) -> None:
    upgrade(pg_dsn)
    body = encode_spans(spans).SerializeToString()
    with serve(create_app(pg_dsn, token="s3cret")) as base:
        assert post(base, body, PROTOBUF).status_code == 401
        assert post(base, body, {**PROTOBUF, "Authorization": "Bearer wrong"}).status_code == 401
        assert counts(pg_dsn)["lm_traces"] == 0
        # The SDK's exporter with the header, as OTEL_EXPORTER_OTLP_HEADERS would set it.
        sender = exporter(base, headers={"Authorization": "Bearer s3cret"})
        assert sender.export(spans) is SpanExportResult.SUCCESS
        assert counts(pg_dsn)["lm_traces"] == 4


def test_no_receiver_when_turned_off(spans: list[Any], pg_dsn: str) -> None:
    upgrade(pg_dsn)
    with serve(create_app(pg_dsn, otlp=None)) as base:
        assert post(base, encode_spans(spans).SerializeToString(), PROTOBUF).status_code in (404, 405)
        assert httpx.get(f"{base}/health").json() == {"status": "ok", "database": "ok"}


def test_bad_settings_are_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--otlp-connections"):
        OtlpSettings(connections=0)
    with pytest.raises(ValueError, match="--otlp-max-body-bytes"):
        OtlpSettings(max_body_bytes=True)


# --- the database away, a full writer -------------------------------------------------------------
def test_database_down_answers_503_with_retry_after_and_the_senders_retries_bring_every_row(
    spans: list[Any], reference: dict[str, Any]
) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(own_migrated_server())
        base = stack.enter_context(serve(create_app(server.dsn)))
        half = len(spans) // 2
        assert exporter(base).export(spans[:half]) is SpanExportResult.SUCCESS  # mid-stream: some are in
        server.halt()
        response = post(base, encode_spans(spans[half:]).SerializeToString(), PROTOBUF)
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        # The SDK's exporter retries 503 with backoff; the database is back within its 30 s.
        result: list[Any] = []
        sending = threading.Thread(target=lambda: result.append(exporter(base, timeout=30).export(spans[half:])))
        sending.start()
        time.sleep(2.0)
        server.resume()
        sending.join(60)
        assert result == [SpanExportResult.SUCCESS]
        assert table_rows(server.dsn) == reference


def test_a_full_writer_answers_503_until_it_drains(spans: list[Any], pg_dsn: str) -> None:
    upgrade(pg_dsn)
    body = encode_spans(spans).SerializeToString()
    app = create_app(pg_dsn, otlp=OtlpSettings(max_queued_spans=5, connections=1))
    with serve(app) as base:
        with psycopg.connect(pg_dsn) as blocker:
            blocker.execute("LOCK TABLE lm_traces IN ACCESS EXCLUSIVE MODE")  # the first write waits on it
            first: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: first.append(post(base, body, PROTOBUF)))
            waiting.start()
            deadline = time.monotonic() + 10
            while not app.state.ingest.in_flight:
                assert time.monotonic() < deadline, "the first request never reached the writer"
                time.sleep(0.01)
            second = post(base, body, PROTOBUF)
            assert second.status_code == 503 and "bound 5" in second.text, second.text
            assert second.headers["Retry-After"] == "1"
        waiting.join(30)  # the lock is gone with the blocking connection
        assert first[0].status_code == 200
        assert post(base, body, PROTOBUF).status_code == 200
        assert counts(pg_dsn)["lm_traces"] == 4

"""OTLP/HTTP trace bodies decoded into the records the Postgres rows are made from (``storage.otlp``).

The reference is the in-process writer: ``snapshot(span)`` of real SDK spans. Bodies are made by the SDK's
own OTLP encoder (``encode_spans``), so a decoded record must equal the snapshot of the span it came from,
field by field and type by type.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode, set_span_in_context

from roma_otel.exporters.postgres_process import SpanRecord, snapshot
from roma_otel.storage import otlp as otlp_module
from roma_otel.storage.otlp import (
    BodyTooLargeError,
    Decoded,
    OtlpDecodeError,
    UnsupportedMediaError,
    decode,
    decompress,
)
from roma_otel.storage.rows import classify
from roma_otel.telemetry import SCOPE
from tests.conftest import make_telemetry

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
FIELDS = (
    "name", "trace_id", "span_id", "parent_span_id", "start_time", "end_time", "status_code",
    "status_description", "attributes",
)  # fmt: skip
MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------------------
def typed(value: Any) -> Any:
    """``value`` with the type of every part beside it, so 1, 1.0 and True (or a tuple and a list) differ."""
    if isinstance(value, dict):
        return dict, {key: typed(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value), tuple(typed(item) for item in value)
    if isinstance(value, float):
        return float, repr(value)  # repr: NaN equals NaN
    return type(value), value


def row(record: SpanRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in FIELDS)


def assert_same(records: list[SpanRecord], spans: list[ReadableSpan]) -> None:
    """Each record equals ``snapshot()`` of the span with its span id, types included."""
    by_id = {record.span_id: record for record in records}
    assert len(by_id) == len(records) == len(spans)
    for span in spans:
        record = by_id[span.context.span_id]
        assert typed(row(record)) == typed(snapshot(span)), span.name


def to_otlp_json(request: ExportTraceServiceRequest, enum_names: bool = False) -> dict[str, Any]:
    """OTLP/JSON for ``request``: protobuf's JSON mapping, with the hex ids OTLP/JSON requires instead
    of base64 (json_format is only the oracle here, never what is tested)."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=not enum_names)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("traceId", "spanId", "parentSpanId"):
                    node[key] = base64.b64decode(item).hex()
                else:
                    hexify(item)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(doc)
    return doc


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def proto_spans(request: ExportTraceServiceRequest) -> Any:
    """The first scope's span list of ``request`` (a protobuf repeated field, editable)."""
    return request.resource_spans[0].scope_spans[0].spans


def roma_tracer(provider: TracerProvider) -> Any:
    return provider.get_tracer(SCOPE, "0")


def plain_provider(resource: Resource | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource) if resource is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def make_typed_spans(provider: TracerProvider) -> None:
    """roma-otel-scope spans with every attribute type the SDK keeps, an error, a root and children."""
    tracer = roma_tracer(provider)
    root = tracer.start_span(
        "roma.execution", attributes={"roma.execution.id": "exec-typed", "roma.execution.max_depth": 2}
    )
    context = set_span_in_context(root)
    child = tracer.start_span(
        "execute_tool lookup",
        context,
        attributes={
            "roma.execution.id": "exec-typed",
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "lookup",
            "roma.tool.input_size": 12,
            "roma.lm.cost_usd": 0.25,
            "roma.lm.cache_hit": False,
            "strings": ["a", "b", ""],
            "ints": [1, -2, 1 << 62],
            "floats": [0.5, -1.0, 1e300],
            "bools": [True, False],
            "empty": [],
            "unicode": "déjà vu ✓",
            "big": -(1 << 63),
        },
    )
    child.set_status(Status(StatusCode.ERROR, "lookup failed: KeyError('k')"))
    child.end()
    ok = tracer.start_span("roma.task", context, attributes={"roma.execution.id": "exec-typed", "roma.task.depth": 1})
    ok.set_status(Status(StatusCode.OK))
    ok.end()
    tracer.start_span("bare", context).end()  # no attributes at all
    root.end()


@pytest.fixture(scope="module")
def roma_spans() -> Iterator[list[ReadableSpan]]:
    """Finished roma-otel spans of a real demo run (LM, module, tool, toolkit, task and execution spans),
    plus spans with every attribute type."""
    from roma_otel.demo.agent import build_offline_lm, run_demo_agent

    tel = make_telemetry()
    try:
        run_demo_agent(lm=build_offline_lm(), max_depth=1)
        make_typed_spans(tel.tracer_provider)
        spans = tel.spans()
    finally:
        tel.instrumentor.uninstrument()
        tel.meter_provider.shutdown()
        dspy.configure(lm=None)
    assert all(span.instrumentation_scope.name == SCOPE for span in spans)
    yield spans


@pytest.fixture
def typed_spans() -> list[ReadableSpan]:
    provider, exporter = plain_provider()
    make_typed_spans(provider)
    return list(exporter.get_finished_spans())


# --- parity with the in-process snapshot ---------------------------------------------------------------
def test_protobuf_records_equal_snapshots(roma_spans: list[ReadableSpan]) -> None:
    body = encode_spans(roma_spans).SerializeToString()
    decoded = decode(body, PROTOBUF)

    assert (decoded.rejected, decoded.errors) == (0, [])
    assert_same(decoded.records, roma_spans)
    # What the comparison covered (else it could pass on spans that have none of it):
    snaps = [snapshot(span) for span in roma_spans]
    assert any(s[3] is None for s in snaps) and any(s[3] is not None for s in snaps)  # root and children
    assert any(s[6] == 2 and s[7] for s in snaps)  # an error with its description
    kinds = {type(v) for s in snaps for v in s[8].values()}
    assert {str, int, float, bool, tuple} <= kinds
    # The row translation sees the same kinds of span.
    by_id = {record.span_id: record for record in decoded.records}
    assert [classify(by_id[span.context.span_id]) for span in roma_spans] == [classify(s) for s in roma_spans]


@pytest.mark.parametrize("enum_names", [False, True], ids=["enum-ints", "enum-names"])
def test_json_records_equal_snapshots(roma_spans: list[ReadableSpan], enum_names: bool) -> None:
    doc = to_otlp_json(encode_spans(roma_spans), enum_names=enum_names)
    decoded = decode(dumps(doc), "application/json; charset=utf-8")

    assert (decoded.rejected, decoded.errors) == (0, [])
    assert_same(decoded.records, roma_spans)


def test_json_and_protobuf_give_equal_records(typed_spans: list[ReadableSpan]) -> None:
    request = encode_spans(typed_spans)
    from_proto = decode(request.SerializeToString(), PROTOBUF).records
    from_json = decode(dumps(to_otlp_json(request)), JSON).records
    assert [typed(row(r)) for r in from_json] == [typed(row(r)) for r in from_proto]
    assert len(from_proto) == 4


def test_hand_written_otlp_json() -> None:
    """OTLP/JSON as other senders write it: int64 as strings or numbers, upper-case hex, special doubles,
    base64 bytes, no or empty parentSpanId, enum names, unknown fields."""
    trace_hex = "5B8EFFF798038103D269B633813FC60C"
    attributes = [
        {"key": "roma.execution.id", "value": {"stringValue": "exec-1"}},
        {"key": "roma.execution.total_tasks", "value": {"intValue": "3"}},
        {"key": "as_number", "value": {"intValue": 7}},
        {"key": "negative", "value": {"intValue": "-9223372036854775808"}},
        {"key": "nan", "value": {"doubleValue": "NaN"}},
        {"key": "inf", "value": {"doubleValue": "Infinity"}},
        {"key": "-inf", "value": {"doubleValue": "-Infinity"}},
        {"key": "whole_double", "value": {"doubleValue": 2}},
        {"key": "double", "value": {"doubleValue": 0.125}},
        {"key": "ok", "value": {"boolValue": True}},
        {
            "key": "mixed",
            "value": {
                "arrayValue": {
                    "values": [{"stringValue": "a"}, {"intValue": "1"}, {"doubleValue": 1.5}, {"boolValue": False}]
                }
            },
        },
        {"key": "nested", "value": {"arrayValue": {"values": [{"arrayValue": {"values": [{"intValue": 1}]}}]}}},
        {"key": "empty_array", "value": {"arrayValue": {}}},
        {"key": "map", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"stringValue": "v"}}]}}},
        {"key": "blob", "value": {"bytesValue": "AAEC/w=="}},
        {"key": "blob_url_unpadded", "value": {"bytesValue": "AAEC_w"}},
        {"key": "unset", "value": {}},
    ]
    doc = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "travel-agent"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "roma_otel", "version": "0.1.0"},
                        "spans": [
                            {
                                "traceId": trace_hex,
                                "spanId": "EEE19B7EC3C1B174",
                                "name": "roma.execution",
                                "kind": 1,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "attributes": attributes,
                                "status": {"code": 2, "message": "boom"},
                                "events": [{"name": "exception", "timeUnixNano": "1544712660500000000"}],
                                "someFutureField": {"x": 1},
                            },
                            {
                                "traceId": trace_hex.lower(),
                                "spanId": "00000000000000aB",
                                "parentSpanId": "eee19b7ec3c1b174",
                                "name": "roma.task",
                                "startTimeUnixNano": 1544712660100000000,
                                "endTimeUnixNano": 1544712660100000000,  # zero length is allowed
                                "status": {"code": "STATUS_CODE_OK"},
                            },
                            {
                                "traceId": trace_hex,
                                "spanId": "0102030405060708",
                                "parentSpanId": "",
                                "startTimeUnixNano": "5",
                                "endTimeUnixNano": "6",
                            },
                        ],
                    }
                ],
            }
        ]
    }
    decoded = decode(dumps(doc), "Application/JSON")

    assert (decoded.rejected, decoded.errors) == (0, [])
    trace_id = int(trace_hex, 16)
    expected = [
        (
            "roma.execution", trace_id, 0xEEE19B7EC3C1B174, None, 1544712660000000000, 1544712661000000000, 2, "boom",
            {
                "roma.execution.id": "exec-1",
                "roma.execution.total_tasks": 3,
                "as_number": 7,
                "negative": -(1 << 63),
                "nan": math.nan,
                "inf": math.inf,
                "-inf": -math.inf,
                "whole_double": 2.0,
                "double": 0.125,
                "ok": True,
                "mixed": ("a", 1, 1.5, False),
                "nested": ((1,),),
                "empty_array": (),
                "map": {"k": "v"},
                "blob": b"\x00\x01\x02\xff",
                "blob_url_unpadded": b"\x00\x01\x02\xff",
                "unset": None,
            },
        ),
        ("roma.task", trace_id, 0xAB, 0xEEE19B7EC3C1B174, 1544712660100000000, 1544712660100000000, 1, None, {}),
        ("", trace_id, 0x0102030405060708, None, 5, 6, 0, None, {}),
    ]  # fmt: skip
    assert [typed(row(r)) for r in decoded.records] == [typed(e) for e in expected]
    assert decoded.records[0].status.status_code is StatusCode.ERROR  # what the row translation reads
    assert decoded.records[1].parent.span_id == 0xEEE19B7EC3C1B174


# --- what is kept --------------------------------------------------------------------------------------
def foreign_and_roma_spans() -> tuple[list[ReadableSpan], list[ReadableSpan]]:
    """(every span, the roma-otel ones): the app's roma_otel and httpx scopes, and another service's."""
    app, app_spans = plain_provider(Resource.create({"service.name": "travel-agent"}))
    other, other_spans = plain_provider(Resource.create({"service.name": "billing"}))
    with roma_tracer(app).start_as_current_span("roma.execution", attributes={"roma.execution.id": "e1"}):
        with app.get_tracer("opentelemetry.instrumentation.httpx").start_as_current_span("GET"):
            pass
        roma_tracer(app).start_span("roma.task", attributes={"roma.execution.id": "e1"}).end()
    other.get_tracer("billing.tracer").start_span("charge", attributes={"roma.execution.id": "e1"}).end()
    other.get_tracer("roma_otel.compat.probe").start_span("near miss").end()
    everything = [*app_spans.get_finished_spans(), *other_spans.get_finished_spans()]
    roma = [span for span in everything if span.instrumentation_scope.name == SCOPE]
    assert len(everything) == 5 and len(roma) == 2
    return everything, roma


def test_foreign_scopes_and_services_are_skipped_not_rejected() -> None:
    everything, roma = foreign_and_roma_spans()
    request = encode_spans(everything)
    assert len(request.resource_spans) == 2  # the two services really are separate resources

    for decoded in (decode(request.SerializeToString(), PROTOBUF), decode(dumps(to_otlp_json(request)), JSON)):
        assert (decoded.rejected, decoded.errors) == (0, [])
        assert_same(decoded.records, roma)


def test_scope_argument_selects_another_scope() -> None:
    everything, _ = foreign_and_roma_spans()
    body = encode_spans(everything).SerializeToString()
    decoded = decode(body, PROTOBUF, scope="billing.tracer")
    assert [r.name for r in decoded.records] == ["charge"] and decoded.rejected == 0


def test_spans_without_roma_attributes_are_decoded() -> None:
    provider, exporter = plain_provider()
    tracer = roma_tracer(provider)
    tracer.start_span("no attributes").end()
    tracer.start_span("unrelated", attributes={"http.method": "GET"}).end()
    spans = list(exporter.get_finished_spans())
    body = encode_spans(spans).SerializeToString()

    decoded = decode(body, PROTOBUF)
    assert decoded.rejected == 0
    assert_same(decoded.records, spans)
    assert [classify(record) for record in decoded.records] == [None, None]  # the row translation drops them


def test_empty_requests() -> None:
    for body, content_type in (
        (b"", PROTOBUF),
        (ExportTraceServiceRequest().SerializeToString(), PROTOBUF),
        (b"{}", JSON),
        (b'{"resourceSpans": []}', JSON),
        (b'{"resourceSpans": [{"scopeSpans": [{"scope": {"name": "roma_otel"}}]}]}', JSON),
    ):
        assert decode(body, content_type) == Decoded([], 0, [])


# --- what is rejected ----------------------------------------------------------------------------------
def test_invalid_protobuf_spans_are_rejected_and_the_rest_kept(typed_spans: list[ReadableSpan]) -> None:
    request = encode_spans(typed_spans)
    spans = proto_spans(request)
    template = copy.deepcopy(spans[0])
    breakages = [
        ("trace_id", b"\x01" * 12),
        ("trace_id", bytes(16)),
        ("span_id", b"\x01" * 4),
        ("span_id", bytes(8)),
        ("parent_span_id", b"\x01" * 4),
        ("start_time_unix_nano", 0),
        ("end_time_unix_nano", template.start_time_unix_nano - 1),
    ]
    for name, value in breakages:
        bad = spans.add()
        bad.CopyFrom(template)
        bad.span_id = b"\x07" * 8
        setattr(bad, name, value)
    unknown_status = spans.add()
    unknown_status.CopyFrom(template)
    unknown_status.span_id = b"\x08" * 8
    unknown_status.status.code = 7  # an open enum: a value no SDK StatusCode has

    decoded = decode(request.SerializeToString(), PROTOBUF)

    assert decoded.rejected == len(breakages) + 1
    assert_same(decoded.records, typed_spans)
    assert len(decoded.errors) == 5 == len(set(decoded.errors))  # a few distinct reasons, not one per span
    assert "trace id" in decoded.errors[0] and "12 bytes" in decoded.errors[0]
    assert all(isinstance(reason, str) and reason for reason in decoded.errors)


def test_each_protobuf_reason_is_named(typed_spans: list[ReadableSpan]) -> None:
    cases = {
        "trace id": ("trace_id", b"\x01" * 15),
        "span id": ("span_id", bytes(8)),
        "parent span id": ("parent_span_id", b"\x01" * 9),
        "times": ("start_time_unix_nano", 0),
    }
    for words, (name, value) in cases.items():
        request = encode_spans(typed_spans[:1])
        setattr(proto_spans(request)[0], name, value)
        decoded = decode(request.SerializeToString(), PROTOBUF)
        assert (decoded.records, decoded.rejected) == ([], 1)
        assert len(decoded.errors) == 1 and words in decoded.errors[0], decoded.errors


def test_invalid_json_spans_are_rejected_and_the_rest_kept(typed_spans: list[ReadableSpan]) -> None:
    doc = to_otlp_json(encode_spans(typed_spans))
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    template = spans[0]
    breakages: list[dict[str, Any]] = [
        {"traceId": "ab" * 12},
        {"traceId": "0" * 32},
        {"traceId": "zz" * 16},
        {"traceId": 12345},
        {"spanId": "00" * 8},
        {"spanId": "ab" * 7},
        {"parentSpanId": "ab" * 4},
        {"startTimeUnixNano": "0"},
        {"startTimeUnixNano": "soon"},
        {"endTimeUnixNano": str(int(template["startTimeUnixNano"]) - 1)},
        {"endTimeUnixNano": str(1 << 64)},
        {"name": 5},
        {"status": "bad"},
        {"status": {"code": 9}},
        {"status": {"code": "STATUS_CODE_MAYBE"}},
        {"attributes": "oops"},
        {"attributes": [{"key": "n", "value": {"intValue": "x"}}]},
        {"attributes": [{"key": "n", "value": {"intValue": 1.5}}]},
        {"attributes": [{"key": "b", "value": {"boolValue": "yes"}}]},
        {"attributes": [{"key": "d", "value": {"doubleValue": "a lot"}}]},
        {"attributes": [{"key": "a", "value": {"arrayValue": {"values": {}}}}]},
        {"attributes": [{"key": "y", "value": {"bytesValue": "not base64!"}}]},
        {"attributes": [{"key": 1, "value": {"stringValue": "x"}}]},
        {"attributes": [{"value": {"stringValue": "no key"}}]},
    ]
    for number, change in enumerate(breakages, start=1):
        bad = {**copy.deepcopy(template), "spanId": f"{number:016x}", **change}
        spans.append(bad)
    spans.append("not a span")

    decoded = decode(dumps(doc), JSON)

    assert decoded.rejected == len(breakages) + 1
    assert_same(decoded.records, typed_spans)
    assert 1 <= len(decoded.errors) <= 5 and len(set(decoded.errors)) == len(decoded.errors)


# --- the lean reader and its attribute cache -----------------------------------------------------------
def test_fields_the_rows_do_not_read_change_nothing(typed_spans: list[ReadableSpan]) -> None:
    """Resources, kinds, flags, trace states, events, links and dropped counts are skipped by the lean
    schema (``storage.otlp_lean``): filled in, they must neither change a record nor break the parse."""
    request = encode_spans(typed_spans)
    resource = request.resource_spans[0]
    resource.resource.attributes.add(key="service.name", value={"string_value": "agents"})
    resource.schema_url = "https://opentelemetry.io/schemas/1.21.0"
    resource.scope_spans[0].scope.version = "9.9"
    resource.scope_spans[0].scope.attributes.add(key="scope.attr", value={"int_value": 3})
    for span in proto_spans(request):
        span.kind = 3
        span.flags = 0x301
        span.trace_state = "vendor=value"
        span.dropped_attributes_count = 4
        event = span.events.add(name="exception", time_unix_nano=span.start_time_unix_nano)
        event.attributes.add(key="exception.message", value={"string_value": "boom"})
        span.links.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8).attributes.add(key="l", value={"bool_value": True})
        span.dropped_events_count = 1
        span.dropped_links_count = 2

    decoded = decode(request.SerializeToString(), PROTOBUF)

    assert (decoded.rejected, decoded.errors) == (0, [])
    assert_same(decoded.records, typed_spans)


def test_recurring_attributes_decode_alike_and_mutable_values_are_not_shared(typed_spans: list[ReadableSpan]) -> None:
    request = encode_spans(typed_spans)
    span = proto_spans(request)[0]
    kvlist = span.attributes.add(key="kv")
    kvlist.value.kvlist_value.values.add(key="inner", value={"string_value": "x"})
    body = request.SerializeToString()

    first, second = (decode(body, PROTOBUF).records for _ in range(2))  # the second mostly from the cache

    assert [typed(row(r)) for r in first] == [typed(row(r)) for r in second]
    assert_same([r for r in first if r.span_id != int.from_bytes(span.span_id, "big")],
                [s for s in typed_spans if s.context.span_id != int.from_bytes(span.span_id, "big")])  # fmt: skip
    one, other = (next(r for r in records if "kv" in r.attributes) for records in (first, second))
    assert one.attributes["kv"] == {"inner": "x"} and one.attributes["kv"] is not other.attributes["kv"]
    assert one.attributes is not other.attributes


def test_the_attribute_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp_module, "_KV_CACHE", {})
    monkeypatch.setattr(otlp_module, "_KV_CACHE_ENTRIES", 8)
    provider, exporter = plain_provider()
    tracer = roma_tracer(provider)
    long_value = "x" * otlp_module._KV_CACHE_BYTES
    for i in range(50):
        tracer.start_span("s", attributes={"n": i, "same": "v", "long": long_value}).end()
    spans = list(exporter.get_finished_spans())

    decoded = decode(encode_spans(spans).SerializeToString(), PROTOBUF)

    assert_same(decoded.records, spans)
    assert 0 < len(otlp_module._KV_CACHE) <= 8
    assert all(len(raw) <= otlp_module._KV_CACHE_BYTES for raw in otlp_module._KV_CACHE)  # "long" never kept


def test_a_corrupt_attribute_is_a_decode_error_as_with_the_full_schema(typed_spans: list[ReadableSpan]) -> None:
    request = encode_spans(typed_spans)
    proto_spans(request)[0].attributes.add(key="text", value={"string_value": "PLACEHOLDER"})
    body = request.SerializeToString().replace(b"PLACEHOLDER", b"\xff" * len("PLACEHOLDER"))  # not UTF-8
    with pytest.raises(DecodeError):  # the full schema refuses the whole body ...
        ExportTraceServiceRequest.FromString(body)
    with pytest.raises(OtlpDecodeError, match="protobuf"):  # ... and so does the lean one, when it reads it
        decode(body, PROTOBUF)


# --- malformed bodies and unsupported requests --------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff", b"garbage bytes, not a protobuf", b"\x0a\x05abc"],
    ids=["varint", "text", "truncated"],
)
def test_garbage_protobuf_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(OtlpDecodeError, match="protobuf"):
        decode(body, PROTOBUF)


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"resourceSpans": [}', b"\xff\xfe{}", b""])
def test_invalid_json_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(OtlpDecodeError, match="JSON"):
        decode(body, JSON)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "resourceSpans",
        {"resourceSpans": {}},
        {"resourceSpans": [1]},
        {"resourceSpans": [{"scopeSpans": "x"}]},
        {"resourceSpans": [{"scopeSpans": [[]]}]},
        {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "roma_otel"}, "spans": {}}]}]},
    ],
)
def test_json_of_the_wrong_shape_is_a_decode_error(doc: Any) -> None:
    with pytest.raises(OtlpDecodeError):
        decode(dumps(doc), JSON)


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/protobuf", "application/jsonl", "json"])
def test_other_content_types_are_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaError):
        decode(b"{}", content_type)


def test_content_type_parameters_and_case_are_ignored(typed_spans: list[ReadableSpan]) -> None:
    request = encode_spans(typed_spans)
    for content_type in ("Application/X-Protobuf", " application/x-protobuf ; charset=binary"):
        assert len(decode(request.SerializeToString(), content_type).records) == 4
    for content_type in ("APPLICATION/JSON", "application/json;charset=UTF-8"):
        assert len(decode(dumps(to_otlp_json(request)), content_type).records) == 4


# --- decompression -------------------------------------------------------------------------------------
BODY = b"an OTLP body " * 1000


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("gzip", gzip.compress(BODY[:500]) + gzip.compress(BODY[500:])),  # two members, as gzip allows
        ("deflate", zlib.compress(BODY)),  # what the SDK sends: zlib-wrapped
        ("Deflate", raw_deflate(BODY)),
        ("identity", BODY),
        ("", BODY),
        (None, BODY),
    ],
    ids=["gzip", "gzip-upper", "x-gzip", "gzip-members", "deflate-zlib", "deflate-raw", "identity", "empty", "none"],
)
def test_decompress_round_trips(encoding: str | None, compressed: bytes) -> None:
    assert decompress(compressed, encoding, len(BODY)) == BODY


def test_decompressed_request_decodes(typed_spans: list[ReadableSpan]) -> None:
    body = encode_spans(typed_spans).SerializeToString()
    decoded = decode(decompress(gzip.compress(body), "gzip", 16 * MiB), PROTOBUF)
    assert_same(decoded.records, typed_spans)


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_other_encodings_are_unsupported(encoding: str) -> None:
    with pytest.raises(UnsupportedMediaError):
        decompress(BODY, encoding, 16 * MiB)


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        ("gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", raw_deflate(BODY)),
        ("identity", BODY),
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "identity"],
)
def test_one_byte_over_the_limit_is_too_large(encoding: str, compressed: bytes) -> None:
    assert decompress(compressed, encoding, len(BODY)) == BODY
    with pytest.raises(BodyTooLargeError):
        decompress(compressed, encoding, len(BODY) - 1)


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    bomb = b"".join(compressor.compress(zeros) for _ in range(50)) + compressor.flush()  # 50 MiB of zeros
    assert len(bomb) < MiB // 10

    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLargeError):
            decompress(bomb, "gzip", MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB  # about the limit, not the 50 MiB the body inflates to


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(BODY)[:-10]),  # truncated
        ("gzip", gzip.compress(BODY)[:-8] + b"\0\0\0\0" + gzip.compress(BODY)[-4:]),  # wrong CRC
        ("gzip", gzip.compress(BODY) + b"trailing junk"),
        ("deflate", b"not deflate at all"),
        ("deflate", zlib.compress(BODY)[:-6]),
        ("deflate", zlib.compress(BODY) + b"trailing junk"),
        ("gzip", b""),
    ],
    ids=["gzip-garbage", "gzip-truncated", "gzip-crc", "gzip-trailing", "deflate-garbage", "deflate-truncated",
         "deflate-trailing", "gzip-empty"],
)  # fmt: skip
def test_corrupt_compressed_bodies_are_decode_errors(encoding: str, body: bytes) -> None:
    with pytest.raises(OtlpDecodeError):
        decompress(body, encoding, 16 * MiB)

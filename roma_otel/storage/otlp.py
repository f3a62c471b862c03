"""Decoding OTLP/HTTP trace requests (``POST /v1/traces``) into the records the Postgres rows are made from.

An OTLP exporter (an SDK's, or a Collector's ``otlphttp``) sends an ``ExportTraceServiceRequest``, as
protobuf (``application/x-protobuf``) or as OTLP/JSON (``application/json``), optionally compressed. This
module turns such a body into ``SpanRecord``s, the same plain records the writer process builds from SDK
spans (``SpanRecord(*snapshot(span))``), so ``storage.rows`` translates a received span exactly as it
translates one made in process: same field values and same Python types (attribute arrays as tuples,
bool/int/float kept apart).

Only spans of roma-otel's instrumentation scope (``telemetry.SCOPE``) are kept; other scopes and services in
the same request are skipped, as the in-process writers skip them. A span that is not valid (bad ids,
times, or JSON it cannot be read from) is *rejected*: counted, with a reason, for the OTLP partial-success
answer, while the request's other spans are kept. A body that cannot be read at all raises
``OtlpDecodeError``; a media type or encoding this receiver does not take raises ``UnsupportedMediaError``;
a body over the size limit once decompressed raises ``BodyTooLargeError``.

Protobuf bodies are read through the lean schema of ``storage.otlp_lean`` (attributes as serialized
``KeyValue`` bytes), with a bounded, thread-safe cache of attributes already decoded.

No I/O and no web framework, so the HTTP layer can run it in a worker thread; its only state is that cache.
"""

from __future__ import annotations

import binascii
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from roma_otel.exporters.postgres_process import SpanRecord
from roma_otel.storage.otlp_lean import LeanRequest
from roma_otel.telemetry import SCOPE

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, RecursionError)
except ImportError:  # pragma: no cover - orjson is in both test environments
    _loads = json.loads
    # json.loads raises UnicodeDecodeError (a ValueError) for a body that is not UTF-8, and RecursionError
    # for absurd nesting, which orjson refuses with its own error.
    _JSON_ERRORS = (ValueError, RecursionError)

__all__ = [
    "JSON",
    "PROTOBUF",
    "BodyTooLargeError",
    "Decoded",
    "OtlpDecodeError",
    "UnsupportedMediaError",
    "decode",
    "decompress",
    "media_type",
]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

_MAX_ERRORS = 5  # distinct reasons kept for the partial-success error_message; the count covers them all
_U64 = 1 << 64  # times are fixed64 in the protobuf: JSON may not claim more than protobuf can carry
_STATUS_CODES = (0, 1, 2)  # UNSET, OK, ERROR: the same numbers in the proto enum and the SDK's StatusCode
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
# zlib window bits: 31 reads a gzip member; 15 a zlib-wrapped deflate stream (what the SDK sends for
# "deflate"); -15 raw deflate, which some clients send under the same name.
_GZIP, _ZLIB, _RAW_DEFLATE = 31, 15, -15
_ENCODINGS = {"": None, "identity": None, "gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}


class OtlpDecodeError(ValueError):
    """The body is malformed: corrupt compression, protobuf or JSON, or JSON of the wrong shape."""


class UnsupportedMediaError(ValueError):
    """A Content-Type or Content-Encoding this receiver does not accept."""


class BodyTooLargeError(ValueError):
    """The body, decompressed, is larger than the limit."""


@dataclass
class Decoded:
    """The records of one request's roma-otel spans, and the spans rejected as invalid."""

    records: list[SpanRecord]
    rejected: int = 0
    errors: list[str] = field(default_factory=list)  # a few distinct English reasons for the rejections


class _Rejected(Exception):
    """One span is not valid; its reason, for ``Decoded.errors``."""


# --- content type and encoding ------------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    """The request's media type, ``PROTOBUF`` or ``JSON`` (parameters and case ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != PROTOBUF and media != JSON:
        raise UnsupportedMediaError(f"unsupported Content-Type {content_type!r}: use {PROTOBUF} or {JSON}")
    return media


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """``body`` decoded from its Content-Encoding (gzip, deflate, identity or none), at most ``max_bytes``.

    The output is bounded while decompressing, so a small compressed body that inflates to gigabytes (a
    "zip bomb") costs no more than ``max_bytes + 1`` bytes of memory before it is refused.
    """
    name = (encoding or "").strip().lower()
    if name not in _ENCODINGS:
        raise UnsupportedMediaError(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or identity")
    wbits = _ENCODINGS[name]
    if wbits is None:
        if len(body) > max_bytes:
            raise BodyTooLargeError(f"body of {len(body)} bytes is over the limit of {max_bytes}")
        return body
    if wbits == _ZLIB:
        try:
            return _inflate(body, _ZLIB, max_bytes)
        except OtlpDecodeError:
            # Not a zlib stream: try it as raw deflate before calling it corrupt (only failures pay this).
            return _inflate(body, _RAW_DEFLATE, max_bytes)
    return _inflate(body, wbits, max_bytes)


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    kind = "gzip" if wbits == _GZIP else "deflate"
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            # Never more than one byte past the limit: that byte is the proof the body is too large.
            out = inflater.decompress(data, max_bytes - size + 1)
        except zlib.error as exc:
            raise OtlpDecodeError(f"corrupt {kind} body: {exc}") from None
        size += len(out)
        if size > max_bytes:
            raise BodyTooLargeError(f"body is over the limit of {max_bytes} bytes once decompressed")
        if not inflater.eof:
            raise OtlpDecodeError(f"truncated {kind} body")
        parts.append(out)
        data = inflater.unused_data
        # gzip allows several members one after the other (gzip.decompress reads them all); a deflate
        # stream is one, and anything after it is not part of the body.
        if not data:
            break
        if wbits != _GZIP:
            raise OtlpDecodeError(f"unexpected data after the end of the {kind} body")
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- decoding -----------------------------------------------------------------------------------------
def decode(body: bytes, content_type: str, scope: str = SCOPE) -> Decoded:
    """The roma-otel spans of an (already decompressed) OTLP traces request body.

    ``content_type`` is the request's Content-Type. Spans whose instrumentation scope is not ``scope`` are
    skipped and not counted; invalid spans are counted in ``rejected``. Raises ``OtlpDecodeError`` for a
    body that cannot be read and ``UnsupportedMediaError`` for another media type.
    """
    if media_type(content_type) == PROTOBUF:
        return _decode_protobuf(body, scope)
    return _decode_json(body, scope)


class _Rejections:
    """Counts rejected spans and keeps the first few distinct reasons."""

    __slots__ = ("count", "reasons")

    def __init__(self) -> None:
        self.count = 0
        self.reasons: dict[str, None] = {}  # a dict, not a set, to keep the reasons in order

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < _MAX_ERRORS:
            self.reasons[reason] = None

    def result(self, records: list[SpanRecord]) -> Decoded:
        return Decoded(records, self.count, list(self.reasons))


def _check_span(trace: int, trace_len: int, span: int, span_len: int, parent_len: int, start: int, end: int) -> None:
    """Raises ``_Rejected`` for ids or times no row can be made from (the same rules for both encodings)."""
    if trace_len != 16 or not trace:
        raise _Rejected(f"invalid trace id ({trace_len} bytes; 16 bytes, not all zero, required)")
    if span_len != 8 or not span:
        raise _Rejected(f"invalid span id ({span_len} bytes; 8 bytes, not all zero, required)")
    if parent_len and parent_len != 8:
        raise _Rejected(f"invalid parent span id ({parent_len} bytes; 8 bytes or none required)")
    if not 0 < start <= end < _U64:
        raise _Rejected("invalid times (0 < start_time_unix_nano <= end_time_unix_nano required)")


# --- protobuf -----------------------------------------------------------------------------------------
# AnyValue oneof fields read as they are: the protobuf value already has the Python type the SDK keeps.
_PB_SCALARS = frozenset(("string_value", "bool_value", "int_value", "double_value", "bytes_value"))
# Decoded attributes by their serialized KeyValue: the same bytes always decode to the same (key, value), and
# most of a span's attributes (execution id, module, model, tool, depth, success) recur in span after span.
# Bounded by entries and by the size of what is cached; emptied when full (no bookkeeping per hit). Only
# immutable values are kept, so the records built from it can share them. Shared by the receiver's threads:
# each dict operation is atomic.
_KV_CACHE: dict[bytes, tuple[str, Any]] = {}
_KV_CACHE_ENTRIES = 32_768
_KV_CACHE_BYTES = 160  # a KeyValue longer than this (a preview, a prompt) is likely unique: not kept


def _decode_protobuf(body: bytes, scope: str) -> Decoded:
    try:
        request = LeanRequest.FromString(body)
        records: list[SpanRecord] = []
        append = records.append
        rejections = _Rejections()
        span_record = _pb_span
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                if scope_spans.scope.name != scope:
                    continue  # another library's or service's spans: not ours to store, and not an error
                for span in scope_spans.spans:
                    try:
                        append(span_record(span))
                    except _Rejected as reason:
                        rejections.add(str(reason))
    except (DecodeError, RecursionError) as exc:
        # The lean parse leaves attributes as bytes, so a corrupt attribute (bad UTF-8, a broken AnyValue)
        # of a span we read surfaces here, and the body is refused as the full schema would refuse it.
        # What is never read (other scopes' spans, resources, events, links, the attributes of a span
        # already rejected) is not checked: such a body is taken where the full schema would refuse it,
        # with nothing of the unread parts stored.
        raise OtlpDecodeError(f"corrupt protobuf body: {exc}") from None
    return rejections.result(records)


def _pb_span(span: Any) -> SpanRecord:
    trace_bytes = span.trace_id
    span_bytes = span.span_id
    parent_bytes = span.parent_span_id
    trace_id = int.from_bytes(trace_bytes, "big")
    span_id = int.from_bytes(span_bytes, "big")
    start = span.start_time_unix_nano
    end = span.end_time_unix_nano
    _check_span(trace_id, len(trace_bytes), span_id, len(span_bytes), len(parent_bytes), start, end)
    status = span.status
    code = status.code
    if code not in _STATUS_CODES:  # proto3 enums are open: a future or bogus value arrives as a plain int
        raise _Rejected(f"invalid status code {code}")
    cached = _KV_CACHE.get
    return SpanRecord(
        span.name,
        trace_id,
        span_id,
        int.from_bytes(parent_bytes, "big") if parent_bytes else None,
        start,
        end,
        code,
        status.message or None,  # the SDK keeps no description as None; protobuf has no None, only ""
        # Repeated keys: the last wins, as when a KeyValue list is read into a dict one by one.
        dict([cached(raw) or _pb_attribute(raw) for raw in span.attributes]),
    )


def _pb_attribute(raw: bytes) -> tuple[str, Any]:
    """A serialized KeyValue as (key, value), the value as the SDK stores it; cached when immutable."""
    kv = KeyValue.FromString(raw)
    value = kv.value
    which = value.WhichOneof("value")
    if which in _PB_SCALARS:
        pair = (kv.key, getattr(value, which))
        if len(raw) <= _KV_CACHE_BYTES:
            if len(_KV_CACHE) >= _KV_CACHE_ENTRIES:
                _KV_CACHE.clear()
            _KV_CACHE[raw] = pair
        return pair
    return (kv.key, _pb_value(value, which))


def _pb_value(value: Any, which: str | None) -> Any:
    """An AnyValue as the SDK stores it: arrays as tuples, key-value lists as dicts, unset as None."""
    if which is None:
        return None
    if which == "array_value":
        return tuple(_pb_value(item, item.WhichOneof("value")) for item in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value, kv.value.WhichOneof("value")) for kv in value.kvlist_value.values}
    return getattr(value, which)


# --- OTLP/JSON ----------------------------------------------------------------------------------------
# Walked by hand: google.protobuf.json_format would read OTLP/JSON's hex ids as base64 without an error
# (and costs some 290 µs a span).
def _decode_json(body: bytes, scope: str) -> Decoded:
    try:
        document = _loads(body)
    except _JSON_ERRORS as exc:
        raise OtlpDecodeError(f"invalid JSON body: {exc}") from None
    if type(document) is not dict:
        raise OtlpDecodeError("the JSON body is not an object (an ExportTraceServiceRequest)")
    records: list[SpanRecord] = []
    append = records.append
    rejections = _Rejections()
    span_record = _json_span
    for resource_spans in _json_list(document, "resourceSpans", "the request"):
        for scope_spans in _json_list(resource_spans, "scopeSpans", "resourceSpans[]"):
            if _json_scope_name(scope_spans) != scope:
                continue
            for span in _json_list(scope_spans, "spans", "scopeSpans[]"):
                try:
                    append(span_record(span))
                except _Rejected as reason:
                    rejections.add(str(reason))
                except (TypeError, ValueError, AttributeError, KeyError, RecursionError):
                    # Any JSON type the walk did not expect inside one span spoils that span only.
                    rejections.add("span with values of the wrong JSON type")
    return rejections.result(records)


def _json_list(parent: Any, key: str, where: str) -> list[Any]:
    """``parent[key]`` as a list (absent or null: empty); an OtlpDecodeError for any other shape."""
    if type(parent) is not dict:
        raise OtlpDecodeError(f"{where} must be a JSON object, not {type(parent).__name__}")
    items = parent.get(key)
    if items is None:
        return []
    if type(items) is not list:
        raise OtlpDecodeError(f"{key} must be a JSON array, not {type(items).__name__}")
    return items


def _json_scope_name(scope_spans: Any) -> Any:
    if type(scope_spans) is not dict:
        raise OtlpDecodeError(f"scopeSpans[] must be a JSON object, not {type(scope_spans).__name__}")
    scope = scope_spans.get("scope")
    return scope.get("name", "") if type(scope) is dict else ""


def _json_span(span: dict[str, Any]) -> SpanRecord:
    trace_bytes = _hex_id(span.get("traceId"), "trace")
    span_bytes = _hex_id(span.get("spanId"), "span")
    parent_bytes = _hex_id(span.get("parentSpanId"), "parent span")
    trace_id = int.from_bytes(trace_bytes, "big")
    span_id = int.from_bytes(span_bytes, "big")
    start = _json_u64(span.get("startTimeUnixNano", 0))
    end = _json_u64(span.get("endTimeUnixNano", 0))
    _check_span(trace_id, len(trace_bytes), span_id, len(span_bytes), len(parent_bytes), start, end)
    name = span.get("name", "")
    if type(name) is not str:
        raise _Rejected("span name is not a JSON string")
    code, message = _json_status(span.get("status"))
    attrs: dict[str, Any] = {}
    for kv in span.get("attributes") or ():
        key = kv["key"]
        value = kv.get("value")
        if type(key) is not str:
            raise _Rejected("attribute key is not a JSON string")
        # Inline for the common kinds (one dict lookup for a string, the most common); the rest, and
        # anything unusual, go through _json_value.
        if type(value) is dict and len(value) == 1:
            raw = value.get("stringValue")
            if type(raw) is str:
                attrs[key] = raw
                continue
            raw = value.get("intValue")
            if type(raw) is str or type(raw) is int:
                attrs[key] = int(raw)  # int64 comes as a string (the spec's choice) or a number
                continue
            raw = value.get("boolValue")
            if type(raw) is bool:
                attrs[key] = raw
                continue
            raw = value.get("doubleValue")
            if type(raw) is float:
                attrs[key] = raw
                continue
        attrs[key] = _json_value(value)
    return SpanRecord(
        name,
        trace_id,
        span_id,
        int.from_bytes(parent_bytes, "big") if parent_bytes else None,
        start,
        end,
        code,
        message,
        attrs,
    )


def _hex_id(raw: Any, what: str) -> bytes:
    """A hex id's bytes (any case); b"" for an absent, null or empty one."""
    if not raw:
        return b""
    if type(raw) is not str:
        raise _Rejected(f"{what} id is not a hex JSON string")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise _Rejected(f"{what} id is not hex") from None


def _json_u64(raw: Any) -> int:
    """A time in ns: OTLP/JSON sends 64-bit integers as strings, but numbers are allowed too."""
    if type(raw) is int:
        return raw
    if type(raw) is str:
        try:
            return int(raw)
        except ValueError:
            raise _Rejected("a time is not an integer") from None
    raise _Rejected("a time is not an integer")


def _json_status(status: Any) -> tuple[int, str | None]:
    if status is None:
        return 0, None
    if type(status) is not dict:
        raise _Rejected("status is not a JSON object")
    code = status.get("code", 0)
    if type(code) is str:  # the spec says integers, but protobuf's JSON mapping also allows the enum's name
        code = _STATUS_NAMES.get(code, code)
    if type(code) is not int or code not in _STATUS_CODES:
        raise _Rejected(f"invalid status code {code!r}")
    message = status.get("message")
    if message is not None and type(message) is not str:
        raise _Rejected("status message is not a JSON string")
    return code, message or None


def _json_value(value: Any) -> Any:
    """An OTLP/JSON AnyValue as the SDK stores it; raises TypeError/ValueError for a wrong JSON type."""
    if value is None:
        return None
    if type(value) is not dict:
        raise TypeError("AnyValue is not a JSON object")
    if "stringValue" in value:
        raw = value["stringValue"]
        if type(raw) is not str:
            raise TypeError("stringValue is not a string")
        return raw
    if "boolValue" in value:
        raw = value["boolValue"]
        if type(raw) is not bool:
            raise TypeError("boolValue is not a boolean")
        return raw
    if "intValue" in value:
        raw = value["intValue"]
        if type(raw) is not int and type(raw) is not str:
            raise TypeError("intValue is not an integer")
        return int(raw)
    if "doubleValue" in value:
        raw = value["doubleValue"]
        # A number, or a string: "NaN", "Infinity" and "-Infinity" can only be sent as strings.
        if type(raw) is not float and type(raw) is not int and type(raw) is not str:
            raise TypeError("doubleValue is not a number")
        return float(raw)
    if "arrayValue" in value:
        return tuple(_json_value(item) for item in _json_values(value["arrayValue"]))
    if "kvlistValue" in value:
        return {kv["key"]: _json_value(kv.get("value")) for kv in _json_values(value["kvlistValue"])}
    if "bytesValue" in value:
        return _base64(value["bytesValue"])
    return None  # an empty AnyValue, or only fields this version does not know: unset


def _json_values(holder: Any) -> list[Any]:
    if type(holder) is not dict:
        raise TypeError("arrayValue/kvlistValue is not a JSON object")
    values = holder.get("values")
    if values is None:
        return []
    if type(values) is not list:
        raise TypeError("values is not a JSON array")
    return values


def _base64(raw: Any) -> bytes:
    """bytes in protobuf's JSON mapping: standard or URL-safe base64, padded or not."""
    if type(raw) is not str:
        raise TypeError("bytesValue is not a string")
    text = raw.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    return binascii.a2b_base64(text, strict_mode=True)

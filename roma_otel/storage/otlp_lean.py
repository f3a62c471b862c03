"""A lean protobuf schema for reading OTLP trace requests: the fields the rows need, attributes left as bytes.

``ExportTraceServiceRequest.FromString`` is cheap (C, upb); what costs is reading the parsed message from
Python, four or five wrapper objects per attribute (``KeyValue``, ``AnyValue``, ``WhichOneof``, the value).
This module derives, from the installed ``opentelemetry-proto`` descriptors, a narrower copy of the same
messages with the same field numbers, so it reads the same bytes:

- only the fields ``storage.otlp`` reads are declared (resources, events, links, kinds, flags and the rest
  stay unknown fields: upb skips them instead of building them);
- ``Span.attributes`` is ``repeated bytes``: each attribute comes out as the serialized ``KeyValue``, one
  bytes object, which ``storage.otlp`` looks up in a cache of attributes already decoded (the same
  execution id, module, model or tool name recurs in span after span) and parses with the real
  ``KeyValue`` only when it is new.

Deriving the schema (not restating field numbers) keeps it right for every ``opentelemetry-proto`` release
the package allows: a renamed or removed field fails at import, naming it, instead of misreading data.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["LeanRequest"]

_PACKAGE = "roma_otel.lean_otlp"
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_INT32 = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL

# Each lean message: its name, the real message, and the fields kept, mapped to what each becomes: the
# name of another lean message, "bytes", "int32" (an enum read as its number), or None (unchanged).
_MESSAGES: tuple[tuple[str, Any, dict[str, str | None]], ...] = (
    ("Request", trace_service_pb2.ExportTraceServiceRequest, {"resource_spans": "ResourceSpans"}),
    ("ResourceSpans", trace_pb2.ResourceSpans, {"scope_spans": "ScopeSpans"}),
    ("ScopeSpans", trace_pb2.ScopeSpans, {"scope": "Scope", "spans": "Span"}),
    ("Scope", common_pb2.InstrumentationScope, {"name": None}),
    (
        "Span",
        trace_pb2.Span,
        {
            "trace_id": None,
            "span_id": None,
            "parent_span_id": None,
            "name": None,
            "start_time_unix_nano": None,
            "end_time_unix_nano": None,
            "attributes": "bytes",
            "status": "Status",
        },
    ),
    ("Status", trace_pb2.Status, {"message": None, "code": "int32"}),
)


def _label(field: Any) -> int:
    # protobuf 7 dropped FieldDescriptor.label for is_repeated (added in 5.x); proto3 has no "required".
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == _REPEATED
    return _REPEATED if repeated else _OPTIONAL


def _lean_file() -> descriptor_pb2.FileDescriptorProto:
    lean = descriptor_pb2.FileDescriptorProto(name="roma_otel_lean_otlp.proto", package=_PACKAGE, syntax="proto3")
    for name, real, kept in _MESSAGES:
        message = lean.message_type.add(name=name)
        fields = {field.name: field for field in real.DESCRIPTOR.fields}
        for field_name, becomes in kept.items():
            if field_name not in fields:
                raise ImportError(f"opentelemetry-proto's {real.DESCRIPTOR.full_name} has no field {field_name!r}")
            source = fields[field_name]
            field = message.field.add(name=field_name, number=source.number, label=_label(source))
            if becomes is None:
                field.type = source.type
            elif becomes == "bytes":
                field.type = _BYTES
            elif becomes == "int32":
                field.type = _INT32
            else:
                field.type = source.type  # a message
                field.type_name = f".{_PACKAGE}.{becomes}"
    return lean


def _build() -> Any:
    pool = descriptor_pool.DescriptorPool()  # private: nothing else can register or clash with these names
    pool.Add(_lean_file())
    return GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Request"))


LeanRequest: Any = _build()

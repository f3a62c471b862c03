"""The span view the row translation reads: what SDK spans and spans from elsewhere both provide.

``storage.rows`` turns finished spans into Postgres rows. It reads a handful of fields (``SpanView``),
which the SDK's ``ReadableSpan`` has, and which ``SpanRecord`` rebuilds from plain values: a span sent
to the writer process as a tuple (``exporters.postgres_process.snapshot``), or a span decoded from an
OTLP request (``storage.otlp``). One translation serves all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from opentelemetry.trace import StatusCode

__all__ = ["SpanRecord", "SpanView"]


class _SpanIds(Protocol):
    @property
    def trace_id(self) -> int: ...
    @property
    def span_id(self) -> int: ...


class _SpanStatus(Protocol):
    @property
    def status_code(self) -> StatusCode: ...
    @property
    def description(self) -> str | None: ...


class SpanView(Protocol):
    """What ``storage.rows`` reads of a finished span."""

    @property
    def name(self) -> str: ...
    @property
    def context(self) -> _SpanIds: ...
    @property
    def parent(self) -> _SpanIds | None: ...
    @property
    def start_time(self) -> int | None: ...
    @property
    def end_time(self) -> int | None: ...
    @property
    def status(self) -> _SpanStatus: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...


_STATUS = {code.value: code for code in StatusCode}


class _Ids:
    __slots__ = ("span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id


class _Status:
    __slots__ = ("description", "status_code")

    def __init__(self, code: int, description: str | None) -> None:
        self.status_code = _STATUS[code]
        self.description = description


# A status without a description (every span that did not fail): one shared, read-only object per code.
_PLAIN_STATUS = {code: _Status(code, None) for code in _STATUS}


class SpanRecord:
    """The parts of a finished span the row translation reads (``storage.rows``), rebuilt from a tuple.

    ``context`` is the record itself (it has the ``trace_id`` and ``span_id`` a SpanContext has), and
    ``parent`` and ``status`` are made when read: the writer process builds one record per span, and
    three objects each cost more than the properties.
    """

    __slots__ = (
        "attributes", "end_time", "name", "parent_span_id", "span_id", "start_time", "status_code",
        "status_description", "trace_id",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent_span_id: int | None,
        start_time: int | None,
        end_time: int | None,
        status_code: int,
        status_description: str | None,
        attributes: dict[str, Any],
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.start_time = start_time
        self.end_time = end_time
        self.status_code = status_code
        self.status_description = status_description
        self.attributes = attributes

    @property
    def context(self) -> SpanRecord:
        return self

    @property
    def parent(self) -> _Ids | None:
        return None if self.parent_span_id is None else _Ids(self.trace_id, self.parent_span_id)

    @property
    def status(self) -> _Status:
        if self.status_description is None:
            return _PLAIN_STATUS[self.status_code]
        return _Status(self.status_code, self.status_description)

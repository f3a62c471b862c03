"""Typed, immutable rows read back from roma-otel's PostgreSQL tables.

Attribute names are the column names, so a record reads like the table; ``from_row`` is the one pure
translation from a driver row (a mapping) to a record, and ``to_dict`` gives the JSON-able form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar, Self

__all__ = [
    "ExecutionRecord",
    "LMTrace",
    "ToolInvocationTrace",
    "ToolkitTrace",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _Record:
    """Shared behaviour; subclasses are frozen, slotted dataclasses whose fields are the table's columns."""

    __slots__ = ()
    TABLE: ClassVar[str]
    # NUMERIC columns arrive as Decimal; callers do arithmetic and JSON with them, so they become float.
    _FLOAT_COLUMNS: ClassVar[frozenset[str]] = frozenset()
    # JSONB columns that are NOT NULL DEFAULT '{}'; a row built by hand may still omit them.
    _DICT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"metadata"})

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The table's columns in declaration order, used to build SELECT lists."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        values: dict[str, Any] = {}
        for name in cls.columns():
            value = row[name]
            if name in cls._FLOAT_COLUMNS and value is not None:
                value = float(value)
            elif name in cls._DICT_COLUMNS and value is None:
                value = {}
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every column, with datetimes as ISO 8601 strings and JSON columns copied, ready for ``json.dumps``."""
        return {name: _jsonable(getattr(self, name)) for name in self.columns()}


@dataclasses.dataclass(frozen=True, slots=True)
class ExecutionRecord(_Record):
    """One row of ``executions``: a solver run and its roll-up totals."""

    TABLE: ClassVar[str] = "executions"
    _FLOAT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"total_cost", "execution_duration"})
    _DICT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"config", "metadata"})

    execution_id: str
    created_at: datetime
    updated_at: datetime
    status: str
    task: str | None
    max_depth: int | None
    solver_type: str | None
    config_version: str | None
    config: dict[str, Any]
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    total_cost: float
    total_tokens: int
    execution_duration: float | None
    max_depth_reached: int
    otel_trace_id: str | None
    metadata: dict[str, Any]
    dag_snapshot: Any  # any JSON value, or None before the first snapshot


@dataclasses.dataclass(frozen=True, slots=True)
class LMTrace(_Record):
    """One row of ``lm_traces``: a language-model call. ``cost_usd`` None means no price was known."""

    TABLE: ClassVar[str] = "lm_traces"
    _FLOAT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"cost_usd", "latency_ms"})

    trace_id: int
    execution_id: str
    otel_trace_id: str
    span_id: str
    parent_span_id: str | None
    task_id: str | None
    depth: int
    module_name: str
    model: str
    created_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost_usd: float | None
    cost_source: str | None
    latency_ms: float
    cache_hit: bool
    error: str | None
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ToolkitTrace(_Record):
    """One row of ``toolkit_traces``: a lifecycle event (create, cache_hit, cache_miss, cleanup)."""

    TABLE: ClassVar[str] = "toolkit_traces"
    _FLOAT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"duration_ms"})

    trace_id: int
    execution_id: str
    timestamp: datetime
    operation: str
    toolkit_class: str | None
    duration_ms: float
    success: bool
    error: str | None
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ToolInvocationTrace(_Record):
    """One row of ``tool_invocation_traces``: a single tool call, timed from its start."""

    TABLE: ClassVar[str] = "tool_invocation_traces"
    _FLOAT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"duration_ms"})

    trace_id: int
    execution_id: str
    toolkit_class: str
    tool_name: str
    invoked_at: datetime
    duration_ms: float
    input_size_bytes: int
    output_size_bytes: int
    success: bool
    error: str | None
    metadata: dict[str, Any]

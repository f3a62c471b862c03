"""Pure translation from finished spans to Postgres rows: no I/O, unit-testable in isolation.

Each function takes a span (a ``storage.spanview.SpanView``: ``name``, ``attributes``, ``context``, ``parent``,
``start_time``, ``end_time``, ``status``) and returns a JSON-native dict keyed by column name
(timestamps as ``*_ns`` epoch nanoseconds), which the writer ships to Postgres as one JSON document per
table and batch, and the spool stores as is. Rows carry the span's trace and span ids (idempotent writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry.trace import StatusCode

from roma_otel import semconv as sc
from roma_otel.compat.otel import ended_attributes
from roma_otel.storage.spanview import SpanView

__all__ = [
    "Batch",
    "classify",
    "dag_node",
    "execution_final",
    "lm_row",
    "node_order",
    "span_attributes",
    "span_error",
    "standalone_batch",
    "to_batch",
    "tool_invocation_row",
    "tool_metadata",
    "toolkit_row",
]

# Span kinds the writer persists.
LM, TOOL, TOOLKIT, ROOT, NODE = "lm", "tool", "toolkit", "root", "node"


def _ts(ns: int | None) -> int:
    # Epoch nanoseconds: JSON-native, and Postgres turns them into timestamps (to_timestamp) server-side.
    return ns or 0


def _hex_trace(span: SpanView) -> str:
    return f"{span.context.trace_id:032x}"


def _hex_span(span_id: int | None) -> str | None:
    return None if span_id is None else f"{span_id:016x}"


def _duration_ms(span: SpanView) -> float:
    return ((span.end_time or 0) - (span.start_time or 0)) / 1e6


def span_error(span: SpanView, attrs: dict[str, Any] | None = None) -> str | None:
    status = span.status
    if status.status_code is not StatusCode.ERROR:
        return None
    if attrs is None:
        attrs = span_attributes(span)
    return status.description or str(attrs.get(sc.ERROR_TYPE, "error"))


def _ids(span: SpanView) -> dict[str, Any]:
    return {"otel_trace_id": _hex_trace(span), "span_id": _hex_span(span.context.span_id)}


# The span's attributes as a plain dict. ``ReadableSpan.attributes`` is a read-only proxy over a
# pure-Python mapping whose missing-key lookups raise and catch KeyError: several microseconds per span
# here. The SDK keeps a plain dict inside, read where compat.otel verified it (the span has ended, so it
# no longer changes); else the attributes are copied once.
span_attributes = ended_attributes


def classify(span: SpanView, attrs: dict[str, Any] | None = None) -> str | None:
    """Which table(s) a span feeds, from its name and attributes alone."""
    if attrs is None:
        attrs = span_attributes(span)
    if sc.EXECUTION_ID not in attrs:
        return None
    op = attrs.get(sc.GEN_AI_OPERATION_NAME)
    if span.name == sc.SPAN_EXECUTION or attrs.get(sc.EXECUTION_IMPLICIT):
        return ROOT
    if op == sc.OP_INVOKE_AGENT and sc.MODULE_CLASS not in attrs:  # an explicit execution, latest conventions
        return ROOT
    if op in (sc.OP_CHAT, sc.OP_TEXT_COMPLETION):
        return LM
    if op == sc.OP_EXECUTE_TOOL:
        return TOOL
    if sc.TOOLKIT_OPERATION in attrs:
        return TOOLKIT
    if span.name == sc.SPAN_TASK or sc.MODULE_CLASS in attrs:
        return NODE
    return None


def lm_row(span: SpanView, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    if attrs is None:
        attrs = span_attributes(span)
    prompt = attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS)
    completion = attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS)
    total = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
    provider = attrs.get(sc.GEN_AI_PROVIDER_NAME)
    request_model = attrs.get(sc.GEN_AI_REQUEST_MODEL, "")
    metadata: dict[str, Any] = {"operation": attrs.get(sc.GEN_AI_OPERATION_NAME)}
    for key, name in (
        (sc.GEN_AI_RESPONSE_MODEL, "response_model"),
        (sc.GEN_AI_REQUEST_TEMPERATURE, "temperature"),
        (sc.GEN_AI_REQUEST_MAX_TOKENS, "max_tokens"),
        (sc.ERROR_TYPE, "error_type"),
    ):
        if key in attrs:
            metadata[name] = attrs[key]
    return {
        "execution_id": str(attrs[sc.EXECUTION_ID]),
        **_ids(span),
        "parent_span_id": _hex_span(span.parent.span_id) if span.parent is not None else None,
        "task_id": attrs.get(sc.TASK_ID),
        "depth": int(attrs.get(sc.TASK_DEPTH, 0)),
        "module_name": str(attrs.get(sc.MODULE, "unattributed")),
        "model": f"{provider}/{request_model}" if provider else str(request_model),
        "created_at_ns": _ts(span.start_time),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        # lm_traces.cost_usd is NUMERIC(14, 8): round here, so a row reads the same before and after storage.
        "cost_usd": None if (cost := attrs.get(sc.LM_COST_USD)) is None else round(float(cost), 8),
        "cost_source": attrs.get(sc.LM_COST_SOURCE),
        "latency_ms": float(attrs.get(sc.LM_LATENCY_MS, _duration_ms(span))),
        "cache_hit": bool(attrs.get(sc.LM_CACHE_HIT, False)),
        "error": span_error(span, attrs),
        "metadata": metadata,
    }


def tool_metadata(attrs: dict[str, Any], trace_hex: str, span_hex: str | None) -> dict[str, Any]:
    """A tool invocation row's metadata: the span's ids (the row's idempotency key) and its place in the tree."""
    metadata: dict[str, Any] = {
        "otel_trace_id": trace_hex,
        "span_id": span_hex,
        "module": attrs.get(sc.MODULE),
        "depth": attrs.get(sc.TASK_DEPTH, 0),
    }
    if sc.TASK_ID in attrs:
        metadata["task_id"] = attrs[sc.TASK_ID]
    if sc.ERROR_TYPE in attrs:
        metadata["error_type"] = attrs[sc.ERROR_TYPE]
    return metadata


def tool_invocation_row(span: SpanView, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    if attrs is None:
        attrs = span_attributes(span)
    metadata = tool_metadata(attrs, _hex_trace(span), _hex_span(span.context.span_id))
    error = span_error(span, attrs)
    duration = attrs.get(sc.TOOL_DURATION_MS)
    success = attrs.get(sc.TOOL_SUCCESS)
    return {
        "execution_id": str(attrs[sc.EXECUTION_ID]),
        "toolkit_class": str(attrs.get(sc.TOOLKIT_CLASS, "")),
        "tool_name": str(attrs.get(sc.GEN_AI_TOOL_NAME, "")),
        "invoked_at_ns": _ts(span.start_time),  # the start of the call, not its end
        "duration_ms": float(duration) if duration is not None else _duration_ms(span),
        "input_size_bytes": int(attrs.get(sc.TOOL_INPUT_SIZE, 0)),
        "output_size_bytes": int(attrs.get(sc.TOOL_OUTPUT_SIZE, 0)),
        "success": bool(success) if success is not None else error is None,
        "error": error,
        "metadata": metadata,
    }


def toolkit_row(span: SpanView, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    if attrs is None:
        attrs = span_attributes(span)
    return {
        "execution_id": str(attrs[sc.EXECUTION_ID]),
        "timestamp_ns": _ts(span.start_time),
        "operation": str(attrs[sc.TOOLKIT_OPERATION]),
        "toolkit_class": attrs.get(sc.TOOLKIT_CLASS),
        "duration_ms": float(attrs.get(sc.TOOLKIT_DURATION_MS, _duration_ms(span))),
        "success": bool(attrs.get(sc.TOOLKIT_SUCCESS, True)),
        "error": attrs.get(sc.TOOLKIT_ERROR),
        "metadata": _ids(span),
    }


def dag_node(span: SpanView, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task or module span as a node of the execution's tree (stored in executions.dag_snapshot)."""
    if attrs is None:
        attrs = span_attributes(span)
    node: dict[str, Any] = {
        "span_id": _hex_span(span.context.span_id),
        "parent_span_id": _hex_span(span.parent.span_id) if span.parent is not None else None,
        "name": span.name,
        "kind": "task" if span.name == sc.SPAN_TASK else ("execution" if classify(span, attrs) == ROOT else "module"),
        "start": datetime.fromtimestamp((span.start_time or 0) / 1e9, UTC).isoformat(),
        "duration_ms": _duration_ms(span),
        "status": "error" if span.status.status_code is StatusCode.ERROR else "ok",
        "depth": attrs.get(sc.TASK_DEPTH, 0),
    }
    for key, name in (
        (sc.MODULE, "module"),
        (sc.MODULE_CLASS, "module_class"),
        (sc.TASK_ID, "task_id"),
        (sc.TASK_GOAL, "goal"),
    ):
        if key in attrs:
            node[name] = attrs[key]
    return node


def execution_final(span: SpanView, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The executions row as the root span's end describes it."""
    if attrs is None:
        attrs = span_attributes(span)
    return {
        "execution_id": str(attrs[sc.EXECUTION_ID]),
        "created_at_ns": _ts(span.start_time),
        "status": str(attrs.get(sc.EXECUTION_STATUS, "failed" if span_error(span, attrs) else "completed")),
        "task": attrs.get(sc.EXECUTION_TASK),
        "max_depth": attrs.get(sc.EXECUTION_MAX_DEPTH),
        "solver_type": attrs.get(sc.EXECUTION_SOLVER_TYPE),
        "config_version": attrs.get(sc.EXECUTION_CONFIG_VERSION),
        "total_tasks": int(attrs.get(sc.EXECUTION_TOTAL_TASKS, 0)),
        "completed_tasks": int(attrs.get(sc.EXECUTION_COMPLETED_TASKS, 0)),
        "failed_tasks": int(attrs.get(sc.EXECUTION_FAILED_TASKS, 0)),
        "total_cost": float(attrs.get(sc.EXECUTION_TOTAL_COST, 0.0)),
        "total_tokens": int(attrs.get(sc.EXECUTION_TOTAL_TOKENS, 0)),
        "execution_duration": float(attrs.get(sc.EXECUTION_DURATION, _duration_ms(span) / 1000.0)),
        "max_depth_reached": int(attrs.get(sc.EXECUTION_MAX_DEPTH_REACHED, 0)),
        "otel_trace_id": _hex_trace(span),
        "metadata": {"implicit": bool(attrs.get(sc.EXECUTION_IMPLICIT, False)), "root_span": span.name},
    }


def node_order(node: dict[str, Any]) -> tuple[str, str]:
    """A tree's node order: by start, ties by span id. The database merges trees in the same order
    (``exporters.postgres``, ``COLLATE "C"``: code-point order, as Python compares strings)."""
    return node["start"], node["span_id"] or ""


_CHILD_TABLES = ("lm", "tools", "toolkit")


@dataclass
class Batch:
    """Rows of one write, in the order they must be written (parents before children, then finals).

    Child rows (LM calls, tool invocations, lifecycle events) are translated on demand: straight into
    COPY text for the writer's fast path (``format_rows``), into dicts for everything else (``rows``).
    """

    executions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> first-seen row
    finals: list[dict[str, Any]] = field(default_factory=list)  # execution rows with end figures and dag
    # Tree nodes to merge into executions already in the database (their root is not in this batch): a
    # receiver's requests, and a writer's pending nodes at shutdown. Merged by span id, so order-free.
    nodes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {t: [] for t in _CHILD_TABLES})
    _spans: dict[str, list[tuple[Any, dict[str, Any]]]] = field(default_factory=lambda: {t: [] for t in _CHILD_TABLES})

    def add(self, table: str, span: Any, attrs: dict[str, Any]) -> None:
        self._spans[table].append((span, attrs))

    def has_rows(self, table: str) -> bool:
        return bool(self._rows[table] or self._spans[table])

    def rows(self, table: str) -> list[dict[str, Any]]:
        """All rows of a child table (translating, once, whatever is still pending)."""
        pending = self._spans[table]
        if pending:
            build = _BUILDERS[table]
            self._rows[table].extend([build(span, attrs) for span, attrs in pending])
            pending.clear()
        return self._rows[table]

    def format_rows(
        self,
        table: str,
        line: Callable[[dict[str, Any]], str],
        span_line: Callable[[Any, dict[str, Any]], str] | None = None,
    ) -> list[str]:
        """Every row of a child table through ``line`` (the COPY formatter), translating pending spans
        without keeping their rows: each row dict dies as soon as it is formatted, so a batch never holds
        hundreds of live dicts for the garbage collector to promote and later sweep. ``span_line``, when
        given, formats a pending span straight from its attributes, exactly as ``line`` formats its row."""
        lines = [line(row) for row in self._rows[table]]
        if span_line is not None:
            lines.extend([span_line(span, attrs) for span, attrs in self._spans[table]])
        else:
            build = _BUILDERS[table]
            lines.extend([line(build(span, attrs)) for span, attrs in self._spans[table]])
        return lines

    @property
    def lm(self) -> list[dict[str, Any]]:
        return self.rows("lm")

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.rows("tools")

    @property
    def toolkit(self) -> list[dict[str, Any]]:
        return self.rows("toolkit")

    def __len__(self) -> int:
        children = sum(len(self._rows[t]) + len(self._spans[t]) for t in _CHILD_TABLES)
        return children + len(self.finals)

    def to_json(self) -> dict[str, Any]:
        return {
            "executions": list(self.executions.values()),
            **{t: self.rows(t) for t in _CHILD_TABLES},
            "finals": self.finals,
            "nodes": self.nodes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        batch = cls(finals=data.get("finals", []), nodes=dict(data.get("nodes") or {}))
        for table in _CHILD_TABLES:
            batch._rows[table] = list(data.get(table, []))
        for row in data.get("executions", []):
            batch.executions[row["execution_id"]] = row
        return batch


_BUILDERS = {"lm": lm_row, "tools": tool_invocation_row, "toolkit": toolkit_row}


def to_batch(
    spans: Iterable[tuple[str, SpanView]], nodes: dict[str, list[dict[str, Any]]], *, persist_toolkit: bool = True
) -> Batch:
    """Translate classified spans into a Batch.

    ``nodes`` accumulates tree nodes per execution across batches (children end before their root);
    a root takes its execution's nodes into its final row's ``dag_snapshot``.
    """
    batch = Batch()
    for kind, span in spans:
        attrs = span_attributes(span)
        execution_id = str(attrs[sc.EXECUTION_ID])
        if execution_id not in batch.executions:
            batch.executions[execution_id] = {
                "execution_id": execution_id,
                "created_at_ns": _ts(span.start_time),
                "otel_trace_id": _hex_trace(span),
            }
        if kind == LM:
            batch.add("lm", span, attrs)
        elif kind == TOOL:
            if persist_toolkit:
                batch.add("tools", span, attrs)
        elif kind == TOOLKIT:
            if persist_toolkit:
                batch.add("toolkit", span, attrs)
        elif kind == NODE:
            nodes.setdefault(execution_id, []).append(dag_node(span, attrs))
        elif kind == ROOT:
            final = execution_final(span, attrs)
            tree = nodes.pop(execution_id, [])
            tree.append(dag_node(span, attrs))
            final["dag_snapshot"] = sorted(tree, key=node_order)
            batch.finals.append(final)
    return batch


def standalone_batch(spans: Iterable[SpanView], *, persist_toolkit: bool = True) -> Batch:
    """The rows of spans that arrive on their own (an OTLP request): nothing is kept between calls, so
    tree nodes whose root is not among ``spans`` go to ``Batch.nodes``, which the writer merges into the
    execution's row, whichever request (or receiver) brings the root, and in any order."""
    classified = [(kind, span) for span in spans if (kind := classify(span)) is not None]
    nodes: dict[str, list[dict[str, Any]]] = {}
    batch = to_batch(classified, nodes, persist_toolkit=persist_toolkit)
    batch.nodes = nodes
    return batch


"""Render an execution as a report: header, task tree (LM calls, tokens, cost, latency per node), slowest tools.

The tree is built from the rows the Postgres writer stores; finished spans reach it through the writer's own
translation (``storage.rows``), so ``roma-otel demo`` and ``roma-otel report`` print the same thing.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from roma_otel import semconv as sc

__all__ = [
    "DEFAULT_SLOWEST",
    "DatabaseUnavailableError",
    "ExecutionNotFoundError",
    "Node",
    "build_tree",
    "execution_tree",
    "fetch_report",
    "load_execution",
    "redact_dsn",
    "render_header",
    "render_report",
    "render_slowest_tools",
    "render_tools",
    "render_tree",
    "report_from_spans",
    "slowest_tools",
    "spans_to_rows",
    "tool_rows",
]

DEFAULT_SLOWEST = 5

Row = Mapping[str, Any]


class ExecutionNotFoundError(LookupError):
    """No executions row has the requested id."""


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be reached, or it has no roma-otel schema."""


@dataclass
class Node:
    kind: str  # execution | task | module
    label: str
    duration_ms: float
    status: str
    depth: int | None = None
    lm_calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    cost_unknown: int = 0
    lm_ms: float = 0.0
    tools: dict[str, int] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def totals(self) -> tuple[int, int, float, int]:
        """(LM calls, tokens, cost, unpriced calls) over this node and everything under it."""
        calls, tokens, cost, unknown = self.lm_calls, self.tokens, self.cost, self.cost_unknown
        for child in self.children:
            c, t, k, u = child.totals()
            calls, tokens, cost, unknown = calls + c, tokens + t, cost + k, unknown + u
        return calls, tokens, cost, unknown


# --- one tree builder, over stored rows ----------------------------------------------------------------
def _epoch(value: Any) -> float:
    """Seconds since the epoch from epoch nanoseconds, a datetime or an ISO 8601 string (0 when unknown)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    if isinstance(value, int | float):
        return value / 1e9
    return 0.0


def _invoked(row: Row) -> float:
    return _epoch(row["invoked_at"] if "invoked_at" in row else row.get("invoked_at_ns"))


def _is_shown(node: Row) -> bool:
    """Executions, tasks, ROMA roles and the program's own modules; DSPy building blocks fold upwards."""
    if node.get("kind") in ("execution", "task"):
        return True
    module = node.get("module")
    return module is not None and (module in sc.ROLES or not str(node.get("module_class", "")).startswith("dspy."))


def _tokens(row: Row) -> int:
    total = row.get("total_tokens")
    if total is None:
        total = (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0)
    return int(total)


def execution_tree(
    execution: Row, nodes: Sequence[Row] | None, lm_calls: Iterable[Row] = (), tool_calls: Iterable[Row] = ()
) -> Node:
    """The execution's tree from its executions row, ``dag_snapshot`` nodes, ``lm_traces`` and tool rows.

    An LM call goes to the nearest shown ancestor of its ``parent_span_id`` among the nodes (to the root
    when its parent is not a node); a tool call to the shown module of its task and module label (in its
    ``metadata``) that was running when it started.
    """
    nodes = [n for n in nodes or () if isinstance(n, Mapping) and n.get("span_id")]
    by_id = {n["span_id"]: n for n in nodes}
    ordered = sorted(nodes, key=lambda n: _epoch(n.get("start")))
    root_raw = next((n for n in ordered if n.get("kind") == "execution"), None)
    duration = root_raw.get("duration_ms") if root_raw is not None else None
    if duration is None:
        duration = float(execution.get("execution_duration") or 0.0) * 1000.0
    label = f"execution {str(execution.get('execution_id', ''))[:8]}  {execution.get('task') or ''}".rstrip()
    root = Node("execution", label, float(duration), str(execution.get("status") or "unknown"))

    made: dict[str, Node] = {}
    shown: list[tuple[Row, Node]] = []
    for raw in ordered:
        if raw is root_raw:
            made[raw["span_id"]] = root
        elif _is_shown(raw):
            kind = "task" if raw.get("kind") == "task" else "module"
            text = str(raw.get("goal") or raw.get("task_id") or "task") if kind == "task" else str(raw["module"])
            node = Node(
                kind, text, float(raw.get("duration_ms") or 0.0), str(raw.get("status") or "ok"), raw.get("depth")
            )
            made[raw["span_id"]] = node
            shown.append((raw, node))

    def holder_of(span_id: Any) -> Node:
        seen: set[Any] = set()
        while span_id in by_id and span_id not in seen:
            if span_id in made:
                return made[span_id]
            seen.add(span_id)
            span_id = by_id[span_id].get("parent_span_id")
        return root

    for raw, node in shown:  # in start order, so children are too
        holder_of(raw.get("parent_span_id")).children.append(node)

    for row in sorted(lm_calls, key=lambda r: str(r.get("span_id"))):  # one summation order for every source
        holder = holder_of(row.get("parent_span_id"))
        holder.lm_calls += 1
        holder.tokens += _tokens(row)
        if row.get("cost_usd") is None:
            holder.cost_unknown += 1
        else:
            holder.cost += float(row["cost_usd"])
        holder.lm_ms += float(row.get("latency_ms") or 0.0)

    for row in tool_calls:
        holder = _tool_holder(row, shown, root)
        name = str(row.get("tool_name", ""))
        holder.tools[name] = holder.tools.get(name, 0) + 1
    return root


def _tool_holder(row: Row, shown: Sequence[tuple[Row, Node]], root: Node) -> Node:
    meta = row.get("metadata") or {}
    task_id, module = meta.get("task_id"), meta.get("module")
    candidates = [
        (raw, node) for raw, node in shown
        if raw.get("kind") != "task" and raw.get("module") == module and raw.get("task_id") == task_id
    ]  # fmt: skip
    if not candidates and task_id is not None:
        candidates = [(raw, node) for raw, node in shown if raw.get("kind") == "task" and raw.get("task_id") == task_id]
    if not candidates:
        return root
    when = _invoked(row)

    def start(item: tuple[Row, Node]) -> float:
        return _epoch(item[0].get("start"))

    running = [c for c in candidates if start(c) <= when <= start(c) + float(c[0].get("duration_ms") or 0) / 1000]
    pool = running or [c for c in candidates if start(c) <= when] or candidates
    return max(pool, key=start)[1]


# --- spans -> the same rows ----------------------------------------------------------------------------
def spans_to_rows(spans: Iterable[Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]:
    """(executions row, LM rows, tool rows) per finished execution, as the Postgres writer would store them."""
    from roma_otel.storage.rows import classify, to_batch

    ordered = sorted(spans, key=lambda s: s.end_time or 0)  # a root ends after its nodes
    batch = to_batch([(kind, s) for s in ordered if (kind := classify(s)) is not None], {})
    lm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    tools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in batch.lm:
        lm[row["execution_id"]].append(row)
    for row in batch.tools:
        tools[row["execution_id"]].append(row)
    finals = sorted(batch.finals, key=lambda f: f["created_at_ns"])
    return [(f, lm[f["execution_id"]], tools[f["execution_id"]]) for f in finals]


def build_tree(spans: Iterable[Any]) -> list[Node]:
    """The tree of every finished execution among ``spans``, in start order."""
    return [execution_tree(final, final["dag_snapshot"], lm, tools) for final, lm, tools in spans_to_rows(spans)]


# --- rendering -----------------------------------------------------------------------------------------
def _money(cost: float, unknown: int) -> str:
    text = f"${cost:.6f}"
    return f"{text} (+{unknown} unpriced)" if unknown else text


def render_tree(roots: Sequence[Node], *, width: int = 60) -> str:
    lines: list[str] = []

    def line(node: Node, prefix: str, connector: str) -> None:
        if node.kind == "module":
            text = (
                f"{node.label:<11} {node.lm_calls:>2} LM call{'s' if node.lm_calls != 1 else ' '} "
                f"{node.tokens:>6} tok  {_money(node.cost, node.cost_unknown):>10}  "
                f"{node.duration_ms:>8.1f} ms"
            )
            if node.tools:
                text += "  tools: " + ", ".join(f"{k}×{v}" for k, v in sorted(node.tools.items()))
        else:
            calls, tokens, cost, unknown = node.totals()
            label = node.label if len(node.label) <= width else node.label[: width - 1] + "…"
            depth = f"[depth {node.depth}] " if node.kind == "task" and node.depth is not None else ""
            text = (
                f"{depth}{label}  — {calls} LM calls, {tokens} tok, {_money(cost, unknown)}, {node.duration_ms:.1f} ms"
            )
            if node.status not in ("ok", "completed"):
                text += f"  [{node.status}]"
        lines.append(f"{prefix}{connector}{text}")
        child_prefix = prefix + ("   " if connector in ("└─ ", "") else "│  ")
        for i, child in enumerate(node.children):
            line(child, child_prefix, "└─ " if i == len(node.children) - 1 else "├─ ")

    for root in roots:
        line(root, "", "")
    return "\n".join(lines)


def render_header(execution: Row) -> str:
    """Goal, status, duration and the executions row's totals."""
    seconds = execution.get("execution_duration")
    duration = "unknown" if seconds is None else f"{float(seconds) * 1000:.1f} ms"
    limit = execution.get("max_depth")
    depth = f"max depth reached {execution.get('max_depth_reached') or 0}" + (
        f" of {limit}" if limit is not None else ""
    )
    totals = (
        f"{execution.get('total_tasks') or 0} tasks ({execution.get('completed_tasks') or 0} completed, "
        f"{execution.get('failed_tasks') or 0} failed), {depth}, {execution.get('total_tokens') or 0} tok, "
        f"${float(execution.get('total_cost') or 0.0):.6f}"
    )
    lines = [
        f"Execution {execution.get('execution_id')}",
        f"  goal:     {execution.get('task') or '(none)'}",
        f"  status:   {execution.get('status')}",
        f"  duration: {duration}",
        f"  totals:   {totals}",
    ]
    if execution.get("solver_type"):
        lines.append(f"  solver:   {execution['solver_type']}")
    return "\n".join(lines)


def slowest_tools(rows: Iterable[Row], n: int) -> list[Row]:
    """The ``n`` longest tool calls, longest first (ties: earliest first)."""
    return sorted(rows, key=lambda r: (-float(r.get("duration_ms") or 0.0), _invoked(r)))[: max(0, n)]


def render_slowest_tools(rows: Sequence[Row]) -> str:
    header = f"{'toolkit.tool':<34} {'duration ms':>11}  {'success':<7}  error type"
    out = [header, "-" * len(header)]
    for r in rows:
        error_type = (r.get("metadata") or {}).get("error_type") or ("" if r.get("success") else "unknown")
        name = f"{r.get('toolkit_class', '')}.{r.get('tool_name', '')}"
        success = "yes" if r.get("success") else "no"
        out.append(f"{name:<34} {float(r.get('duration_ms') or 0.0):>11.2f}  {success:<7}  {error_type}".rstrip())
    if not rows:
        out.append("(no tool calls)")
    return "\n".join(out)


def render_report(
    execution: Row, root: Node, tool_calls: Sequence[Row], *, slowest: int = DEFAULT_SLOWEST, note: str = ""
) -> str:
    """Header, tree and the ``slowest`` longest tool calls: what ``roma-otel report`` prints."""
    parts = [
        render_header(execution),
        "",
        "Execution tree (LM calls, tokens, cost and latency per node):",
        render_tree([root]),
    ]
    if slowest > 0:
        top = slowest_tools(tool_calls, slowest)
        parts += ["", f"Slowest tool calls ({len(top)} of {len(tool_calls)}):", render_slowest_tools(top)]
    if note:
        parts += ["", note]
    return "\n".join(parts)


def report_from_spans(spans: Iterable[Any], *, slowest: int = DEFAULT_SLOWEST) -> str:
    """The report of every finished execution among ``spans`` (no database involved)."""
    return "\n\n".join(
        render_report(final, execution_tree(final, final["dag_snapshot"], lm, tools), tools, slowest=slowest)
        for final, lm, tools in spans_to_rows(spans)
    )


# --- Postgres ------------------------------------------------------------------------------------------
def redact_dsn(dsn: str) -> str:
    """``dsn`` (URL or libpq key=value) with any password replaced by ``***``."""
    text = re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


async def _load(dsn: str, execution_id: str, timeout: float) -> tuple[Any, list[Any], list[Any]] | None:
    from roma_otel.config import PostgresConfig
    from roma_otel.storage.postgres import MAX_LIMIT, PostgresStorage

    config = PostgresConfig(connection_url=dsn, pool_min_size=1, pool_max_size=2)
    async with PostgresStorage(config, open_timeout=timeout) as storage:
        record = await storage.get_execution(execution_id)
        if record is None:
            return None
        lm = await storage.get_lm_traces(execution_id, limit=MAX_LIMIT)
        tools = await storage.get_tool_invocation_traces(execution_id, limit=MAX_LIMIT)
    return record, lm, tools


def load_execution(
    dsn: str, execution_id: str, *, timeout: float = 10.0
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(executions row, LM rows, tool rows) of one execution, read from Postgres as plain dicts.

    Raises ExecutionNotFoundError, or DatabaseUnavailableError when the database cannot be reached or lacks
    roma-otel's tables.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from roma_otel.storage.postgres import SchemaMissingError, StorageUnavailableError

    where = redact_dsn(dsn)
    try:
        if "connect_timeout" not in conninfo_to_dict(dsn):
            dsn = make_conninfo(dsn, connect_timeout=max(1, math.ceil(timeout)))
        loaded = asyncio.run(_load(dsn, execution_id, timeout))
    except SchemaMissingError as exc:
        raise DatabaseUnavailableError(str(exc)) from exc
    except (StorageUnavailableError, psycopg.Error, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailableError(f"cannot read PostgreSQL at {where}: {reason}") from exc
    if loaded is None:
        raise ExecutionNotFoundError(f"execution {execution_id} not found")
    record, lm, tools = loaded
    return record.to_dict(), [r.to_dict() for r in lm], [r.to_dict() for r in tools]


def fetch_report(dsn: str, execution_id: str, *, slowest: int = DEFAULT_SLOWEST, timeout: float = 10.0) -> str:
    """``roma-otel report``: the execution's report, from Postgres only."""
    from roma_otel.storage.postgres import MAX_LIMIT

    execution, lm, tools = load_execution(dsn, execution_id, timeout=timeout)
    root = execution_tree(execution, execution.get("dag_snapshot"), lm, tools)
    capped = [f"{n} {what}" for n, what in ((len(lm), "LM calls"), (len(tools), "tool calls")) if n >= MAX_LIMIT]
    note = f"(only the first {' and '.join(capped)} were read)" if capped else ""
    return render_report(execution, root, tools, slowest=slowest, note=note)


# --- the span-only tool table (roma-otel demo) ---------------------------------------------------------
def tool_rows(spans: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per (toolkit, tool): calls, failures, mean/p95 duration, bytes in/out."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        attrs = dict(span.attributes or {})
        if sc.GEN_AI_TOOL_NAME in attrs:
            groups[(str(attrs.get(sc.TOOLKIT_CLASS, "")), str(attrs[sc.GEN_AI_TOOL_NAME]))].append(attrs)
    rows = []
    for (toolkit, tool), items in sorted(groups.items()):
        durations = sorted(float(a.get(sc.TOOL_DURATION_MS, 0.0)) for a in items)
        p95 = durations[min(len(durations) - 1, math.ceil(0.95 * len(durations)) - 1)]
        rows.append(
            {
                "toolkit_class": toolkit,
                "tool_name": tool,
                "calls": len(items),
                "failed": sum(1 for a in items if not a.get(sc.TOOL_SUCCESS, True)),
                "avg_ms": sum(durations) / len(durations),
                "p95_ms": p95,
                "bytes_in": sum(int(a.get(sc.TOOL_INPUT_SIZE, 0)) for a in items),
                "bytes_out": sum(int(a.get(sc.TOOL_OUTPUT_SIZE, 0)) for a in items),
            }
        )
    return rows


def render_tools(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'toolkit.tool':<34} {'calls':>5} {'failed':>6} {'avg ms':>8} {'p95 ms':>8} {'in B':>7} {'out B':>7}"
    out = [header, "-" * len(header)]
    for r in rows:
        out.append(
            f"{r['toolkit_class'] + '.' + r['tool_name']:<34} {r['calls']:>5} {r['failed']:>6} "
            f"{r['avg_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['bytes_in']:>7} {r['bytes_out']:>7}"
        )
    if not rows:
        out.append("(no tool calls)")
    return "\n".join(out)

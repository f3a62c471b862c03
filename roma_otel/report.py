"""Render finished spans as an execution tree (module, LM calls, tokens, cost, latency per node) and a tool table.

Pure functions over span data, used by ``roma-otel demo``. A node is an execution, a task, or a module
that is a ROMA role or the program's own class; DSPy building blocks (Predict, ReAct, ...) fold into
the nearest such node, and LM and tool spans are summed into it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from roma_otel import semconv as sc

__all__ = ["Node", "build_tree", "render_tools", "render_tree", "tool_rows"]


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


def _attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def _duration_ms(span: Any) -> float:
    if span.start_time is None or span.end_time is None:
        return 0.0
    return (span.end_time - span.start_time) / 1e6


def _status(span: Any) -> str:
    return "error" if span.status.status_code.name == "ERROR" else "ok"


def _is_lm(attrs: dict[str, Any]) -> bool:
    return attrs.get(sc.GEN_AI_OPERATION_NAME) in (sc.OP_CHAT, sc.OP_TEXT_COMPLETION)


def _as_node(span: Any, attrs: dict[str, Any]) -> Node | None:
    if span.name == sc.SPAN_EXECUTION or attrs.get(sc.EXECUTION_IMPLICIT):
        task = attrs.get(sc.EXECUTION_TASK) or span.name
        label = f"execution {str(attrs.get(sc.EXECUTION_ID, ''))[:8]}  {task}"
        return Node(
            "execution", label, _duration_ms(span), str(attrs.get(sc.EXECUTION_STATUS, _status(span)))
        )
    if span.name == sc.SPAN_TASK:
        goal = str(attrs.get(sc.TASK_GOAL) or attrs.get(sc.TASK_ID) or "task")
        depth = attrs.get(sc.TASK_DEPTH)
        return Node("task", goal, _duration_ms(span), _status(span), depth=depth)
    module = attrs.get(sc.MODULE)
    if module is None or _is_lm(attrs) or span.name.startswith(sc.SPAN_TOOL_PREFIX):
        return None
    if module in sc.ROLES or not str(attrs.get(sc.MODULE_CLASS, "")).startswith("dspy."):
        return Node("module", str(module), _duration_ms(span), _status(span), depth=attrs.get(sc.TASK_DEPTH))
    return None


def build_tree(spans: Iterable[Any]) -> list[Node]:
    """Executions (and any other root nodes) with their tasks and modules, in start order."""
    ordered = sorted(spans, key=lambda s: s.start_time or 0)
    ids = {s.context.span_id for s in ordered}
    children: dict[int | None, list[Any]] = defaultdict(list)
    for span in ordered:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children[parent].append(span)

    roots: list[Node] = []

    def walk(span: Any, holder: Node | None) -> None:
        attrs = _attrs(span)
        node = _as_node(span, attrs)
        if node is not None:
            (holder.children if holder is not None else roots).append(node)
            holder = node
        elif holder is not None and _is_lm(attrs):
            holder.lm_calls += 1
            holder.tokens += int(attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS, 0)) + int(
                attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, 0)
            )
            if sc.LM_COST_USD in attrs:
                holder.cost += float(attrs[sc.LM_COST_USD])
            else:
                holder.cost_unknown += 1
            holder.lm_ms += _duration_ms(span)
        elif holder is not None and sc.GEN_AI_TOOL_NAME in attrs:
            name = str(attrs[sc.GEN_AI_TOOL_NAME])
            holder.tools[name] = holder.tools.get(name, 0) + 1
        for child in children.get(span.context.span_id, []):
            walk(child, holder)

    for span in children[None]:
        walk(span, None)
    return roots


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
                f"{depth}{label}  — {calls} LM calls, {tokens} tok, {_money(cost, unknown)}, "
                f"{node.duration_ms:.1f} ms"
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


def tool_rows(spans: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per (toolkit, tool): calls, failures, mean/p95 duration, bytes in/out."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        attrs = _attrs(span)
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

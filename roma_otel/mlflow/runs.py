"""What one MLflow run holds, built from a finished execution, and cut into ``log_batch`` requests.

A ``RunRecord`` is a plain snapshot (names, tags, params, metrics, JSON artifacts) the bridge's
worker writes; nothing here talks to MLflow, so building one never blocks the observed program.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from roma_otel.version import __version__

if TYPE_CHECKING:
    from roma_otel.context import ExecutionContext

__all__ = [
    "MAX_ENTITIES_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_PARAM_VALUE",
    "RunRecord",
    "execution_run",
    "metric_key",
    "toolkit_summary",
]

# MLflow's log_batch limits (mlflow.utils.validation): per request, and per value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # under the 1 MB request cap, leaving room for the JSON envelope
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_RUN_NAME = 120

TAG_KIND = "roma_otel.kind"  # execution | compile | evaluate
TAG_VERSION = "roma_otel.version"

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


def metric_key(name: str) -> str:
    """``name`` made valid as an MLflow metric/param/tag key (letters, digits, ``_ . - space``; 250 chars)."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).strip()[:MAX_KEY]
    return "_" if key in ("", ".", "..") else key


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_VALUE]


@dataclass
class RunRecord:
    """One run to write: ``key`` ties it to the traces that must be linked to it."""

    key: tuple[str, str]
    run_name: str
    start_ms: int
    end_ms: int
    status: str  # FINISHED | FAILED
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # artifact path -> JSON-able object

    def add_tag(self, key: str, value: Any) -> None:
        if value is not None:
            self.tags[metric_key(key)] = str(value)[:MAX_TAG_VALUE]

    def add_param(self, key: str, value: Any) -> None:
        if value is not None:
            self.params[metric_key(key)] = _param_value(value)

    def add_metric(self, key: str, value: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            self.metrics[metric_key(key)] = float(value)

    def batches(self) -> list[tuple[dict[str, float], dict[str, str], dict[str, str]]]:
        """(metrics, params, tags) chunks, each one ``log_batch`` request within MLflow's limits."""
        out: list[tuple[dict[str, float], dict[str, str], dict[str, str]]] = []
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        size = 0

        def flush() -> None:
            nonlocal metrics, params, tags, size
            if metrics or params or tags:
                out.append((metrics, params, tags))
            metrics, params, tags, size = {}, {}, {}, 0

        items: list[tuple[str, str, Any]] = [
            *(("p", k, v) for k, v in self.params.items()),
            *(("t", k, v) for k, v in self.tags.items()),
            *(("m", k, v) for k, v in self.metrics.items()),
        ]
        for kind, key, value in items:
            cost = len(key) + len(str(value)) + 64
            full = (
                len(metrics) + len(params) + len(tags) >= MAX_ENTITIES_PER_BATCH
                or size + cost > MAX_BATCH_BYTES
                or (kind == "m" and len(metrics) >= MAX_METRICS_PER_BATCH)
                or (kind == "p" and len(params) >= MAX_PARAMS_TAGS_PER_BATCH)
                or (kind == "t" and len(tags) >= MAX_PARAMS_TAGS_PER_BATCH)
            )
            if full:
                flush()
            {"m": metrics, "p": params, "t": tags}[kind][key] = value
            size += cost
        flush()
        return out


def run_name_from(text: str | None, fallback: str) -> str:
    name = " ".join((text or "").split()) or fallback
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 1] + "…"


def toolkit_summary(ctx: ExecutionContext) -> dict[str, Any]:
    """Tool-call aggregates of one execution, shaped like ``PostgresStorage.get_toolkit_metrics_summary``."""
    calls = list(ctx.tool_invocations)
    events = list(ctx.toolkit_events)
    hits = sum(1 for e in events if e.operation == "cache_hit")
    misses = sum(1 for e in events if e.operation == "cache_miss")
    summary: dict[str, Any] = {
        "execution_id": ctx.execution_id,
        "toolkit_lifecycle": {
            "total_created": sum(1 for e in events if e.operation == "create"),
            "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        },
    }
    ok = sum(1 for c in calls if c.success)
    total_ms = sum(c.duration_ms for c in calls)
    summary["tool_invocations"] = {
        "total_calls": len(calls),
        "successful_calls": ok,
        "failed_calls": len(calls) - ok,
        "success_rate": ok / len(calls) if calls else 0.0,
        "avg_duration_ms": total_ms / len(calls) if calls else 0.0,
        "total_duration_ms": total_ms,
    }
    by_toolkit: dict[str, dict[str, Any]] = {}
    by_tool: dict[str, dict[str, Any]] = {}
    for c in calls:
        for table, name in ((by_toolkit, c.toolkit_class), (by_tool, f"{c.toolkit_class}.{c.tool_name}")):
            row = table.setdefault(name, {"calls": 0, "successful": 0, "failed": 0, "total_duration_ms": 0.0})
            row["calls"] += 1
            row["successful"] += int(c.success)
            row["failed"] += int(not c.success)
            row["total_duration_ms"] += c.duration_ms
    for table in (by_toolkit, by_tool):
        for row in table.values():
            row["avg_duration_ms"] = row.pop("total_duration_ms") / row["calls"]
    summary["by_toolkit"] = by_toolkit
    summary["by_tool"] = by_tool
    return summary


def optimizer_run(
    key: tuple[str, str], kind: str, run_name: str, start: float, end: float, error: BaseException | None
) -> RunRecord:
    """The common part of a compile or evaluate run: its times, status, kind and version tags, and the error."""
    run = RunRecord(
        key=key,
        run_name=run_name,
        start_ms=int(start * 1000),
        end_ms=int(end * 1000),
        status="FAILED" if error is not None else "FINISHED",
    )
    run.add_tag(TAG_KIND, kind)
    run.add_tag(TAG_VERSION, __version__)
    if error is not None:
        run.add_tag("error", f"{type(error).__name__}: {error}")
    return run


def execution_run(
    ctx: ExecutionContext,
    *,
    fallback_name: str = "execution",
    persist_tools: bool = False,
) -> RunRecord:
    """The seed's run for one finished execution: tags, params, run-level, per-module and toolkit metrics."""
    summary = ctx.summary()
    end = ctx.end_time if ctx.end_time is not None else ctx.start_time + summary["execution_duration"]
    run = RunRecord(
        key=("execution", ctx.execution_id),
        run_name=run_name_from(ctx.task, fallback_name),
        start_ms=int(ctx.start_time * 1000),
        end_ms=int(end * 1000),
        status="FAILED" if ctx.status == "failed" else "FINISHED",
    )
    # User tags first, so the fixed ones below win on a clash.
    for key, value in ctx.metadata.items():
        if isinstance(value, str | int | float | bool):
            run.add_tag(key, value)
    run.add_tag("execution_id", ctx.execution_id)
    run.add_tag("solver_type", ctx.solver_type)
    run.add_tag(TAG_VERSION, __version__)
    run.add_tag(TAG_KIND, "execution")

    run.add_param("task", ctx.task)
    run.add_param("max_depth", ctx.max_depth)
    run.add_param("config_version", ctx.config_version)
    run.add_param("solver_type", ctx.solver_type)

    for name, value in summary.items():
        run.add_metric(name, value)
    for module, stats in sorted(ctx.module_stats.items()):
        run.add_metric(f"{module}_calls", stats.calls)
        run.add_metric(f"{module}_tokens", stats.tokens)
        run.add_metric(f"{module}_cost", stats.cost)
        run.add_metric(f"{module}_avg_latency", stats.avg_latency_ms)

    if ctx.tool_invocations:
        tools = toolkit_summary(ctx)
        run.add_metric("toolkit_success_rate", tools["tool_invocations"]["success_rate"])
        run.add_metric("avg_tool_duration_ms", tools["tool_invocations"]["avg_duration_ms"])
        for toolkit, row in sorted(tools["by_toolkit"].items()):
            run.add_metric(f"{toolkit}_calls", row["calls"])
        if persist_tools:
            run.artifacts["toolkit/summary.json"] = tools
            run.artifacts["toolkit/tool_invocations.json"] = [
                {
                    "toolkit_class": c.toolkit_class,
                    "tool_name": c.tool_name,
                    "invoked_at": c.invoked_at.isoformat(),
                    "duration_ms": c.duration_ms,
                    "input_size_bytes": c.input_size_bytes,
                    "output_size_bytes": c.output_size_bytes,
                    "success": c.success,
                    "error": c.error,
                }
                for c in ctx.tool_invocations
            ]
    return run

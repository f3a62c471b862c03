"""Execution state that travels with the program: which execution and task a call belongs to.

Everything here lives in ``contextvars`` so it follows asyncio tasks for free; the thread hooks in
``instrumentation/threads.py`` carry it into DSPy's worker threads. ``ExecutionContext`` also holds
the per-execution accumulators (cost, tokens, per-module LM usage, tasks, tool records) that end up
on the execution's span, in its metrics and in the MLflow/Postgres bridges.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ExecutionContext",
    "ModuleStats",
    "TaskScope",
    "ToolInvocation",
    "ToolkitEvent",
]


@dataclass(slots=True)
class ToolInvocation:
    """One tool call, shaped like a ``tool_invocation_traces`` row."""

    execution_id: str
    toolkit_class: str
    tool_name: str
    invoked_at: datetime  # the start of the call (ROMA records the end; that is wrong)
    duration_ms: float
    input_size_bytes: int
    output_size_bytes: int
    success: bool
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolkitEvent:
    """One toolkit lifecycle event, shaped like a ``toolkit_traces`` row."""

    execution_id: str
    timestamp: datetime
    operation: str
    toolkit_class: str
    duration_ms: float
    success: bool
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ModuleStats:
    """LM usage attributed to one module label (the seed's ``{module}_*`` metrics)."""

    calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    latency_ms_total: float = 0.0
    cost_units: int = 0  # the exact sum behind ``cost`` (see cost_units)

    def add_cost(self, cost: float) -> None:
        self.cost_units += cost_units(cost)
        self.cost = self.cost_units / COST_UNITS_PER_USD

    @property
    def avg_latency_ms(self) -> float:
        return self.latency_ms_total / self.calls if self.calls else 0.0


@dataclass(frozen=True, slots=True)
class TaskScope:
    """The task-tree node the current code runs for."""

    task_id: str | None
    depth: int
    goal: str | None = None
    agent_type: str | None = None


# Costs are summed as integers of 10^-12 USD: a float sum of many calls drifts (0.0028499999999999997
# for calls that add up to 0.00285), and a total then rounds differently from the same calls summed
# exactly, as Postgres sums lm_traces.cost_usd.
COST_UNITS_PER_USD = 10**12


def cost_units(cost: float) -> int:
    """``cost`` USD in whole 10^-12 USD (far below any price's precision)."""
    return round(cost * COST_UNITS_PER_USD)


# The names of ExecutionContext.figures(), as the seed's MLflow run metrics call them.
SUMMARY_FIELDS = (
    "total_tasks",
    "completed_tasks",
    "failed_tasks",
    "total_cost",
    "total_tokens",
    "execution_duration",
    "max_depth_reached",
)

_EXECUTION: ContextVar[ExecutionContext | None] = ContextVar("roma_otel_execution", default=None)
_TASK: ContextVar[TaskScope | None] = ContextVar("roma_otel_task", default=None)


class ExecutionContext:
    """One execution: a ROMA solver run, an explicit ``roma_otel.execution``, or an outermost module call.

    ``ExecutionContext.get()`` returns the current one or None, as in the seed's troubleshooting
    snippet. Accumulators are guarded by a lock because DSPy's worker threads share the context.
    """

    __slots__ = (
        "_cost_units",
        "_lock",
        "_tasks",
        "completion_tokens",
        "config_version",
        "cost_unknown_calls",
        "end_time",
        "enriched",
        "execution_id",
        "implicit",
        "inputs",
        "lm_calls",
        "max_depth",
        "max_depth_reached",
        "metadata",
        "module_stats",
        "output",
        "prompt_tokens",
        "root_started",
        "solver_type",
        "start_time",
        "status",
        "task",
        "tool_invocations",
        "toolkit_events",
        "total_cost",
    )

    def __init__(
        self,
        execution_id: str,
        # Not keyword-only: an outermost module call makes one per call, and passing these by position
        # saves a quarter of the constructor's cost.
        task: str | None = None,
        max_depth: int | None = None,
        solver_type: str | None = None,
        config_version: str | None = None,
        implicit: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.task = task
        self.max_depth = max_depth
        self.solver_type = solver_type
        self.config_version = config_version
        self.implicit = implicit
        self.enriched = False  # details added after the span started (a solver inside a module call)
        # False until the execution's root span has started: a span processor's on_start that sees a
        # roma-otel span while this is False is looking at the root (see mlflow/traces.py).
        self.root_started = False
        self.metadata = metadata if metadata is not None else {}
        self.inputs: dict[str, Any] | None = None  # an outermost module call's keyword arguments
        self.output: Any = None  # what the execution returned (a solver's or an outermost module's result)
        self.start_time = time.time()
        self.end_time: float | None = None
        self.status = "running"
        self._lock = threading.Lock()
        self.total_cost = 0.0
        self._cost_units = 0
        self.cost_unknown_calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.lm_calls = 0
        self.module_stats: dict[str, ModuleStats] = {}
        self._tasks: dict[str, str] = {}  # task id -> running | completed | failed
        self.max_depth_reached = 0
        self.toolkit_events: list[ToolkitEvent] = []
        self.tool_invocations: list[ToolInvocation] = []

    # --- the seed's API -----------------------------------------------------------------------
    @staticmethod
    def get() -> ExecutionContext | None:
        return _EXECUTION.get()

    # --- accumulation (any thread) ------------------------------------------------------------
    def add_lm_call(
        self, module: str, input_tokens: int, output_tokens: int, cost: float | None, latency_ms: float
    ) -> None:
        with self._lock:
            self.lm_calls += 1
            self.prompt_tokens += input_tokens
            self.completion_tokens += output_tokens
            if cost is None:
                self.cost_unknown_calls += 1
            else:
                self._cost_units += cost_units(cost)
                self.total_cost = self._cost_units / COST_UNITS_PER_USD
            stats = self.module_stats.get(module)
            if stats is None:
                stats = self.module_stats[module] = ModuleStats()
            stats.calls += 1
            stats.tokens += input_tokens + output_tokens
            if cost:
                stats.add_cost(cost)
            stats.latency_ms_total += latency_ms

    def task_started(self, task_id: str, depth: int) -> None:
        with self._lock:
            self._tasks.setdefault(task_id, "running")
            if depth > self.max_depth_reached:
                self.max_depth_reached = depth

    def task_finished(self, task_id: str, ok: bool) -> None:
        with self._lock:
            # A task that failed in any of its steps stays failed.
            if self._tasks.get(task_id) != "failed":
                self._tasks[task_id] = "completed" if ok else "failed"

    def add_tool_invocation(self, record: ToolInvocation) -> None:
        with self._lock:
            self.tool_invocations.append(record)

    def add_toolkit_event(self, record: ToolkitEvent) -> None:
        with self._lock:
            self.toolkit_events.append(record)

    # --- derived figures ----------------------------------------------------------------------
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def has_tasks(self) -> bool:
        return bool(self._tasks)

    def task_counts(self) -> tuple[int, int, int]:
        """(total, completed, failed); an execution with no task scopes counts as one task."""
        if not self._tasks:  # the common case of a run without task scopes: no lock, no copy
            status = self.status  # "running" counts as neither
            return 1, int(status == "completed"), int(status == "failed")
        with self._lock:
            statuses = list(self._tasks.values())
        # Tasks still "running" at the end were left unfinished by the program: not completed.
        return len(statuses), statuses.count("completed"), statuses.count("failed")

    @property
    def execution_duration(self) -> float:
        """Seconds, wall clock; final once the execution has ended."""
        end = self.end_time if self.end_time is not None else time.time()
        return end - self.start_time

    def figures(self) -> tuple[int, int, int, float, int, float, int]:
        """The run-level figures in ``SUMMARY_FIELDS`` order: ``summary()`` without building a dict, for
        the end of every execution (an outermost module call is one)."""
        if self._tasks:
            total, completed, failed = self.task_counts()
        else:  # task_counts' common case, inline: this runs once per outermost module call
            status = self.status
            total, completed, failed = 1, int(status == "completed"), int(status == "failed")
        end = self.end_time if self.end_time is not None else time.time()
        cost = self.total_cost
        return (
            total,
            completed,
            failed,
            round(cost, 10) if cost else 0.0,  # round() with digits formats the float: skip it for 0
            self.prompt_tokens + self.completion_tokens,
            end - self.start_time,
            self.max_depth_reached,
        )

    def summary(self) -> dict[str, Any]:
        """Run-level figures, named as the seed's MLflow metrics."""
        return dict(zip(SUMMARY_FIELDS, self.figures(), strict=True))

    def __repr__(self) -> str:
        return f"ExecutionContext(execution_id={self.execution_id!r}, status={self.status!r})"

"""Executions and task scopes: the public ``execution`` and ``task`` context managers and their bookkeeping.

An execution is a ROMA solver run, an explicit ``roma_otel.execution(...)``, or (when neither is
active) the outermost instrumented module call. Its end puts the run-level figures on its span, in the
execution/task metrics, and hands the finished ``ExecutionContext`` to the bridges' listeners.
"""

from __future__ import annotations

import functools
import inspect
import random
import time
from collections.abc import Callable
from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from roma_otel import semconv as sc
from roma_otel import telemetry
from roma_otel.context import _EXECUTION, _TASK, ExecutionContext, TaskScope
from roma_otel.instrumentation import content
from roma_otel.telemetry import Telemetry, enabled_context, mark_error

__all__ = ["execution", "new_id", "task"]

_MAX_TASK_TEXT = 1000


def new_id() -> str:
    """A random 128-bit id as 32 lowercase hex digits: every outermost module call makes one, and this is
    a third of the cost of formatting the int (and of uuid4)."""
    return random.getrandbits(128).to_bytes(16, "big").hex()


def execution_attributes(ctx: ExecutionContext) -> dict[str, Any]:
    """What an execution's root span carries from its start: its id, its details, and whether a module
    call made it."""
    attrs: dict[str, Any] = {sc.EXECUTION_ID: ctx.execution_id, sc.TASK_DEPTH: 0}
    if ctx.implicit:
        attrs[sc.EXECUTION_IMPLICIT] = True
    if ctx.task is not None:
        task = ctx.task if type(ctx.task) is str else str(ctx.task)
        attrs[sc.EXECUTION_TASK] = task[:_MAX_TASK_TEXT]
    if ctx.max_depth is not None:
        attrs[sc.EXECUTION_MAX_DEPTH] = ctx.max_depth
    if ctx.solver_type is not None:
        attrs[sc.EXECUTION_SOLVER_TYPE] = ctx.solver_type
    if ctx.config_version is not None:
        attrs[sc.EXECUTION_CONFIG_VERSION] = ctx.config_version
    return attrs


def _agent_name(ctx: ExecutionContext) -> str:
    return ctx.solver_type or "roma"


def mark_agent(attrs: dict[str, Any], name: str) -> dict[str, Any]:
    """``attrs`` with what makes a span an agent invocation in the latest GenAI conventions (opt-in)."""
    attrs[sc.GEN_AI_OPERATION_NAME] = sc.OP_INVOKE_AGENT
    attrs[sc.GEN_AI_AGENT_NAME] = name
    return attrs


def _agent_root_attributes(ctx: ExecutionContext) -> dict[str, Any]:
    return mark_agent(execution_attributes(ctx), _agent_name(ctx))


def finish_execution(
    tel: Telemetry | None,
    ctx: ExecutionContext,
    span: Span | None,
    failed: bool,
    pending: dict[str, Any] | None = None,
) -> None:
    """Close the books on an execution: span attributes, metrics, listeners. Never raises.

    ``pending``: the root span's start attributes not written yet (``Telemetry.start_root_span``).
    """
    ctx.end_time = time.time()
    status = ctx.status = "failed" if failed else "completed"
    if tel is None:
        return
    try:
        total_tasks, completed_tasks, failed_tasks, cost, tokens, duration, depth_reached = ctx.figures()
        if span is not None and span.is_recording():
            attrs = pending if pending is not None else {}
            attrs[sc.EXECUTION_ID] = ctx.execution_id  # a solver inside may have adopted ROMA's own id
            attrs[sc.EXECUTION_STATUS] = status
            attrs[sc.EXECUTION_TOTAL_TASKS] = total_tasks
            attrs[sc.EXECUTION_COMPLETED_TASKS] = completed_tasks
            attrs[sc.EXECUTION_FAILED_TASKS] = failed_tasks
            attrs[sc.EXECUTION_TOTAL_COST] = cost
            attrs[sc.EXECUTION_TOTAL_TOKENS] = tokens
            attrs[sc.EXECUTION_DURATION] = duration
            attrs[sc.EXECUTION_MAX_DEPTH_REACHED] = depth_reached
            if ctx.enriched:
                attrs.update(execution_attributes(ctx))
            if tel.redactor is not None and not ctx.implicit:
                attrs.update(content.input_attributes(tel, content.execution_inputs(ctx.task), True))
                if ctx.output is not None:
                    attrs.update(content.output_attributes(tel, ctx.output, True))
            if ctx.implicit and not ctx.enriched:
                # An outermost module call: figures computed here over its root's start attributes (plain
                # values, the typed config's version, class names); the execution and task ids and the
                # depth reached may come from a user's code. Anything else (a goal) is checked.
                plain = (
                    type(ctx.execution_id) is str
                    and type(attrs.get(sc.TASK_ID, "")) is str
                    and type(depth_reached) is int  # from task(depth=...)
                )
                tel.set_attributes(span, attrs, plain)
            else:
                tel.set_attributes(span, attrs)
        tel.execution_ends.record(failed, duration, cost, span if span is not None else trace.get_current_span())
        # tasks_total counts task-tree nodes; a run with no task scopes has none to count.
        if ctx._tasks:  # ctx.has_tasks, without the property call: this runs per outermost module call
            if completed_tasks:
                tel.tasks.add(completed_tasks, {sc.L_STATUS: "completed"})
            if failed_tasks:
                tel.tasks.add(failed_tasks, {sc.L_STATUS: "failed"})
        for listener in tel.execution_listeners:
            try:
                listener(ctx)
            except Exception as exc:
                tel.internal_error(f"execution listener {getattr(listener, '__name__', listener)}", exc)
    except Exception as exc:
        tel.internal_error("finish_execution", exc)


class execution:
    """Mark a block or a function as one execution (sync ``with``, ``async with``, or a decorator).

    Inside an active execution started by a module call, it adds the given details to that
    execution; inside an explicit one, it joins it (executions do not nest).
    """

    def __init__(
        self,
        task: str | None = None,
        *,
        max_depth: int | None = None,
        solver_type: str | None = None,
        config_version: str | None = None,
        execution_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._kwargs = {
            "task": task,
            "max_depth": max_depth,
            "solver_type": solver_type,
            "config_version": config_version,
            "execution_id": execution_id,
            "metadata": metadata,
        }
        self._state: tuple[Any, ...] | None = None

    # --- context manager ------------------------------------------------------------------------
    def __enter__(self) -> ExecutionContext:
        self._state = _begin(**self._kwargs)
        return self._state[0]

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        state, self._state = self._state, None
        if state is not None:
            _end(*state, exc)

    async def __aenter__(self) -> ExecutionContext:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    # --- decorator ------------------------------------------------------------------------------
    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        kwargs = dict(self._kwargs)
        if kwargs["task"] is None:
            kwargs["task"] = func.__qualname__
        kwargs.pop("execution_id")  # each call is its own execution

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kw: Any) -> Any:
                async with execution(**kwargs):
                    return await func(*args, **kw)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kw: Any) -> Any:
            with execution(**kwargs):
                return func(*args, **kw)

        return wrapper


def _begin(
    *,
    task: str | None,
    max_depth: int | None,
    solver_type: str | None,
    config_version: str | None,
    execution_id: str | None,
    metadata: dict[str, Any] | None,
) -> tuple[ExecutionContext, Span | None, Token[Any] | None, object, Telemetry | None, dict[str, Any] | None]:
    active = _EXECUTION.get()
    if active is not None:
        if active.implicit:
            # A solver or explicit block inside an outermost module call: that call is the execution.
            for name, value in (
                ("task", task),
                ("max_depth", max_depth),
                ("solver_type", solver_type),
                ("config_version", config_version),
            ):
                if value is not None and getattr(active, name) is None:
                    setattr(active, name, value)
                    active.enriched = True
            if metadata:
                active.metadata.update(metadata)
        return active, None, None, None, None, None

    # Under suppress_instrumentation() the block still gets its ExecutionContext, but no telemetry.
    current = enabled_context()
    tel = telemetry.ACTIVE if current is not None else None
    if config_version is None and tel is not None:
        config_version = tel.config_version
    ctx = ExecutionContext(
        execution_id or new_id(),
        task=task,
        max_depth=max_depth,
        solver_type=solver_type,
        config_version=config_version,
        metadata=metadata,
    )
    span: Span | None = None
    otel_token: object = None
    pending: dict[str, Any] | None = None
    # Set before the span starts, so a span processor's on_start finds the execution (see root_started).
    ex_token = _EXECUTION.set(ctx)
    if tel is not None and current is not None:
        try:
            if tel.genai_latest:  # an execution is an agent invocation in the latest GenAI conventions
                name = f"{sc.OP_INVOKE_AGENT} {_agent_name(ctx)}"
                span, pending = tel.start_root_span(name, ctx, current, _agent_root_attributes, ctx)
            else:
                span, pending = tel.start_root_span(sc.SPAN_EXECUTION, ctx, current, execution_attributes, ctx)
            otel_token = otel_context.attach(trace.set_span_in_context(span, current))
        except Exception as exc:
            tel.internal_error("execution.start", exc)
    ctx.root_started = True
    return ctx, span, ex_token, otel_token, tel, pending


def _end(
    ctx: ExecutionContext,
    span: Span | None,
    ex_token: Token[Any] | None,
    otel_token: object,
    tel: Telemetry | None,
    pending: dict[str, Any] | None,
    exc: BaseException | None,
) -> None:
    if ex_token is None:  # joined an existing execution: its owner closes it
        return
    failed = exc is not None
    if span is not None and exc is not None:
        mark_error(span, exc)
    finish_execution(tel, ctx, span, failed, pending)
    if span is not None:
        span.end()
    if otel_token is not None:
        otel_context.detach(otel_token)  # type: ignore[arg-type]
    _EXECUTION.reset(ex_token)


class task:
    """One node of the task tree: a span, a depth for everything inside, and a task counted at the end.

    ``depth`` defaults to the enclosing task's depth + 1 (0 at the top). A task whose block raises
    counts as failed; the exception propagates unchanged.
    """

    def __init__(
        self,
        goal: str | None = None,
        *,
        depth: int | None = None,
        task_id: str | None = None,
        agent_type: str | None = None,
        span: bool = True,
    ) -> None:
        self.goal = goal
        self.depth = depth
        self.task_id = task_id
        self.agent_type = agent_type
        self._make_span = span
        self._state: tuple[Token[TaskScope | None], Span | None, object] | None = None

    def __enter__(self) -> TaskScope:
        parent = _TASK.get()
        depth = self.depth if self.depth is not None else (parent.depth + 1 if parent is not None else 0)
        scope = TaskScope(self.task_id or new_id()[:16], depth, self.goal, self.agent_type)
        ctx = _EXECUTION.get()
        if ctx is not None:
            ctx.task_started(scope.task_id, depth)  # type: ignore[arg-type]
        span: Span | None = None
        otel_token: object = None
        tel = telemetry.ACTIVE
        current = enabled_context() if tel is not None and self._make_span else None
        if tel is not None and current is not None and not tel.skip_span(current):
            try:
                attrs: dict[str, Any] = {sc.TASK_ID: scope.task_id, sc.TASK_DEPTH: depth}
                if ctx is not None:
                    attrs[sc.EXECUTION_ID] = ctx.execution_id
                if self.goal is not None:
                    attrs[sc.TASK_GOAL] = self.goal[:_MAX_TASK_TEXT]
                if self.agent_type is not None:
                    attrs[sc.TASK_AGENT_TYPE] = self.agent_type
                span = tel.start_span(sc.SPAN_TASK, SpanKind.INTERNAL, attrs, current)
                otel_token = otel_context.attach(trace.set_span_in_context(span, current))
            except Exception as exc:
                tel.internal_error("task.start", exc)
        self._state = (_TASK.set(scope), span, otel_token)
        return scope

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        token, span, otel_token = state
        scope = _TASK.get()
        ctx = _EXECUTION.get()
        if ctx is not None and scope is not None and scope.task_id is not None:
            ctx.task_finished(scope.task_id, exc is None)
        if span is not None:
            if exc is not None:
                mark_error(span, exc)
            else:
                span.set_status(Status(StatusCode.OK))
            span.end()
        if otel_token is not None:
            otel_context.detach(otel_token)  # type: ignore[arg-type]
        _TASK.reset(token)

    async def __aenter__(self) -> TaskScope:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

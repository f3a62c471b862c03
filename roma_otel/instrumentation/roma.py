"""Hooks into ROMA (``roma_dspy``) when it is installed: solver runs, task-DAG steps, toolkits.

- ``RecursiveSolver.solve/async_solve/event_solve/async_event_solve`` become executions carrying the
  goal, max_depth and solver type (nested calls, e.g. ``solve`` -> ``asyncio.run(async_solve)``,
  join the outer one).
- ``ModuleRuntime._execute_agent_with_tracing`` sets the task scope (id, depth) for the agent step,
  so every span inside carries its depth in the task tree and the execution counts its tasks.
- ``ToolkitManager`` lifecycle and ``BaseToolkit`` tools are handled in ``lifecycle``/``tools``.

roma-otel never imports ROMA: importing it patches litellm and CodeAct and logs, which a program that
does not use ROMA must not see. A class whose module is already imported is patched at ``instrument()``;
the others when the program imports their module (``Patcher.when_imported``, a post-import hook).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

from roma_otel.context import _EXECUTION, _TASK, TaskScope
from roma_otel.instrumentation.executions import execution
from roma_otel.instrumentation.lifecycle import instrument_toolkit_manager
from roma_otel.instrumentation.patching import Patcher

__all__ = ["instrument_roma", "roma_available"]

logger = logging.getLogger("roma_otel")

_SOLVER_METHODS = ("solve", "async_solve", "event_solve", "async_event_solve")
# What compat.degraded names when a ROMA class has a shape roma-otel does not recognise.
_PACKAGE, _WHAT = "roma-dspy", "ROMA executions, tasks and toolkit lifecycle"


def roma_available() -> bool:
    """Whether ``roma_dspy`` is imported or importable; finding it imports nothing."""
    return "roma_dspy" in sys.modules or importlib.util.find_spec("roma_dspy") is not None


def _goal(task: Any) -> str | None:
    if task is None:
        return None
    if isinstance(task, str):
        return task
    goal = getattr(task, "goal", None)
    return str(goal) if goal is not None else str(task)


def _max_depth(solver: Any) -> int | None:
    for holder, attr in (
        (solver, "max_depth"),
        (getattr(getattr(solver, "config", None), "runtime", None), "max_depth"),
    ):
        value = getattr(holder, attr, None) if holder is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _config_version(solver: Any) -> str | None:
    config = getattr(solver, "config", None)
    for attr in ("config_version", "version"):
        value = getattr(config, attr, None)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def _execution_for(solver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> execution:
    return execution(
        _goal(kwargs.get("task", args[0] if args else None)),
        max_depth=_max_depth(solver),
        solver_type=type(solver).__name__,
        config_version=_config_version(solver),
    )


def _answer(task: Any) -> Any:
    """What a solver run answered: the solved task's ``result`` (ROMA's TaskNode), else what it returned."""
    result = getattr(task, "result", None)
    return task if result is None else result


def _wrap_solver(original: Any) -> Any:
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_solve(self: Any, *args: Any, **kwargs: Any) -> Any:
            async with _execution_for(self, args, kwargs) as ctx:
                result = await original(self, *args, **kwargs)
                ctx.output = _answer(result)
                return result

        return async_solve

    @functools.wraps(original)
    def solve(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _execution_for(self, args, kwargs) as ctx:
            result = original(self, *args, **kwargs)
            ctx.output = _answer(result)
            return result

    return solve


def _task_scope(agent_type: Any, task: Any) -> TaskScope:
    task_id = getattr(task, "task_id", None) or getattr(task, "id", None)
    depth = getattr(task, "depth", None)
    if not isinstance(depth, int) or isinstance(depth, bool):
        parent = _TASK.get()
        depth = parent.depth + 1 if parent is not None else 0
    agent = getattr(agent_type, "value", agent_type)
    return TaskScope(
        str(task_id) if task_id is not None else None,
        depth,
        _goal(task),
        str(agent).lower() if agent is not None else None,
    )


def _wrap_agent_step(original: Any) -> Any:
    @functools.wraps(original)
    async def _execute_agent_with_tracing(
        self: Any, agent_type: Any, task: Any, *args: Any, **kwargs: Any
    ) -> Any:
        try:
            scope = _task_scope(agent_type, task)
        except Exception:
            return await original(self, agent_type, task, *args, **kwargs)
        ctx = _EXECUTION.get()
        if ctx is not None and scope.task_id is not None:
            ctx.task_started(scope.task_id, scope.depth)
        token = _TASK.set(scope)
        ok = False
        try:
            result = await original(self, agent_type, task, *args, **kwargs)
            ok = True
            return result
        finally:
            _TASK.reset(token)
            if ctx is not None and scope.task_id is not None:
                ctx.task_finished(scope.task_id, ok)

    return _execute_agent_with_tracing


def _adopt_execution_id(execution_id: Any) -> None:
    """Use ROMA's own execution id for the running execution, so spans, rows and ROMA's logs join."""
    ctx = _EXECUTION.get()
    if ctx is None or not execution_id or ctx.metadata.get("roma_execution_id") is not None:
        return
    ctx.metadata["roma_execution_id"] = str(execution_id)
    ctx.execution_id = str(execution_id)
    ctx.enriched = True  # the execution's span was started with the old id: re-set it at the end


def _wrap_context_set(patcher: Patcher, context_cls: type) -> None:
    raw = context_cls.__dict__.get("set")
    if not isinstance(raw, classmethod):
        return
    func = raw.__func__

    @functools.wraps(func)
    def set(cls: type, *args: Any, **kwargs: Any) -> Any:
        result = func(cls, *args, **kwargs)
        try:
            _adopt_execution_id(kwargs.get("execution_id", args[0] if args else None))
        except Exception as exc:
            logger.debug("roma-otel: could not adopt ROMA's execution id: %r", exc)
        return result

    set._roma_otel_original = func  # type: ignore[attr-defined]
    patcher.replace(context_cls, "set", classmethod(set))


def _hook_solver(patcher: Patcher, solver: type) -> None:
    for method in _SOLVER_METHODS:
        patcher.wrap_function(solver, method, _wrap_solver)


def _hook_runtime(patcher: Patcher, runtime: type) -> None:
    if inspect.iscoroutinefunction(runtime.__dict__.get("_execute_agent_with_tracing")):
        patcher.wrap_function(runtime, "_execute_agent_with_tracing", _wrap_agent_step)


# (module, class, how it is patched): the modules are only ever imported by the program.
_TARGETS: tuple[tuple[str, str, Callable[[Patcher, type], None]], ...] = (
    ("roma_dspy.core.engine.solve", "RecursiveSolver", _hook_solver),
    ("roma_dspy.core.engine.runtime", "ModuleRuntime", _hook_runtime),
    ("roma_dspy.core.context.execution_context", "ExecutionContext", _wrap_context_set),
    ("roma_dspy.tools.base.manager", "ToolkitManager", instrument_toolkit_manager),
)


def _hook_class(
    patcher: Patcher, name: str, hook: Callable[[Patcher, type], None], module: types.ModuleType
) -> None:
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        logger.debug("roma-otel: %s.%s not hooked: no such class", module.__name__, name)
        return
    hook(patcher, cls)


def instrument_roma(patcher: Patcher) -> None:
    if not roma_available():
        return
    for module, name, hook in _TARGETS:
        patcher.when_imported(module, functools.partial(_hook_class, patcher, name, hook), _PACKAGE, _WHAT)

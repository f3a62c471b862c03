"""Carry the OTel context and roma-otel's execution/task/module state into DSPy's worker threads.

DSPy's ``ParallelExecutor`` (behind ``dspy.Parallel``, ``Evaluate(num_threads=...)`` and the
optimizers) copies only its own thread-local overrides into its pool, so without this every span a
worker makes starts a new trace. Only our variables are carried, not the whole ``contextvars``
context: DSPy relies on each worker having its own copy of its settings (the usage tracker).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context

from roma_otel import telemetry
from roma_otel.context import _EXECUTION, _TASK
from roma_otel.instrumentation.modules import _MODULE
from roma_otel.instrumentation.patching import Patcher

__all__ = ["bind_context", "instrument_threads"]


def bind_context(function: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``function`` bound to the caller's trace and execution, for running in another thread."""
    parent = otel_context.get_current()
    execution = _EXECUTION.get()
    task = _TASK.get()
    module = _MODULE.get()

    @functools.wraps(function)
    def run_in_parent_context(*args: Any, **kwargs: Any) -> Any:
        otel_token = otel_context.attach(parent)
        ex_token = _EXECUTION.set(execution)
        task_token = _TASK.set(task)
        module_token = _MODULE.set(module)
        try:
            return function(*args, **kwargs)
        finally:
            _MODULE.reset(module_token)
            _TASK.reset(task_token)
            _EXECUTION.reset(ex_token)
            otel_context.detach(otel_token)

    return run_in_parent_context


def _wrap_execute(original: Any) -> Any:
    @functools.wraps(original)
    def execute(self: Any, function: Callable[..., Any], data: Any) -> Any:
        if telemetry.ACTIVE is not None:
            try:
                function = bind_context(function)
            except Exception as exc:
                telemetry.ACTIVE.internal_error("threads.bind", exc)
        return original(self, function, data)

    return execute


def instrument_threads(patcher: Patcher) -> None:
    from roma_otel.compat.dspy import parallel_executor_class

    executor = parallel_executor_class()
    if executor is not None:
        patcher.wrap_function(executor, "execute", _wrap_execute)

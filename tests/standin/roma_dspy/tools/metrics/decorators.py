"""Tracking decorators; records are appended to the active ExecutionContext (if any)."""

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from roma_dspy.core.context import ExecutionContext
from roma_dspy.tools.metrics.models import ToolInvocationEvent, ToolkitLifecycleEvent


def _record(attr: str, factory: Callable[..., Any], start: float, error: BaseException | None, **fields):
    ctx = ExecutionContext.get()
    if ctx is not None:
        message = None if error is None else f"{type(error).__name__}: {error}"
        getattr(ctx, attr).append(factory(execution_id=ctx.execution_id, success=error is None, error=message,
                                          duration_ms=(time.perf_counter() - start) * 1000, **fields))


def track_tool_invocation(tool_name: str, toolkit_class: str) -> Callable:
    def done(start: float, error: BaseException | None) -> None:
        _record("tool_invocations", ToolInvocationEvent, start, error,
                toolkit_class=toolkit_class, tool_name=tool_name)

    def decorator(func: Callable) -> Callable:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    result = await func(*args, **kwargs)
                except Exception as exc:
                    done(start, exc)
                    raise
                done(start, None)
                return result
            return async_wrapper

        @functools.wraps(func)
        def sync_wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = func(*args, **kwargs)
            except Exception as exc:
                done(start, exc)
                raise
            done(start, None)
            return result
        return sync_wrapper

    return decorator


def track_toolkit_lifecycle(operation: str) -> Callable:
    """For async ToolkitManager methods (ROMA decorates cleanup_execution with it)."""

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            start, error = time.perf_counter(), None
            try:
                return await func(*args, **kwargs)
            except Exception as exc:
                error = exc
                raise
            finally:
                _record("toolkit_events", ToolkitLifecycleEvent, start, error, operation=operation,
                        toolkit_class=None)
        return wrapper

    return decorator

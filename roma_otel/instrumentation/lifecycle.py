"""Toolkit lifecycle events (create, cache_hit, cache_miss, cleanup): the public API and ROMA's hook.

``record_toolkit_event`` and ``toolkit_operation`` work for any program; when the program uses
``roma_dspy`` its ``ToolkitManager`` is hooked (once its module is imported, see ``roma``) so creation,
cache lookups (hits *and* misses, which ROMA never emits) and cleanup are recorded with no code change.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind, Status, StatusCode

from roma_otel import semconv as sc
from roma_otel import telemetry
from roma_otel.context import _EXECUTION, _TASK, ToolkitEvent
from roma_otel.instrumentation.patching import Patcher

__all__ = ["instrument_toolkit_manager", "record_toolkit_event", "toolkit_operation"]


def record_toolkit_event(
    operation: str,
    toolkit_class: str,
    *,
    duration_ms: float = 0.0,
    success: bool = True,
    error: str | None = None,
    metadata: dict[str, Any] | None = None,
    execution_id: str | None = None,
) -> None:
    """Record one lifecycle event that has just ended; ``duration_ms`` is how long it took.

    Raises ValueError for an unknown ``operation`` (a programming error in the caller); nothing
    else here raises.
    """
    if operation not in sc.TOOLKIT_OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(sc.TOOLKIT_OPERATIONS)}; got {operation!r}")
    tel = telemetry.ACTIVE
    if tel is None or not tel.track_lifecycle or not is_instrumentation_enabled():
        return
    try:
        end_ns = time.time_ns()
        ctx = _EXECUTION.get()
        task = _TASK.get()
        exec_id = execution_id or (ctx.execution_id if ctx is not None else None)
        if not tel.skip_span():
            attrs: dict[str, Any] = {
                sc.TOOLKIT_OPERATION: operation,
                sc.TOOLKIT_CLASS: toolkit_class,
                sc.TOOLKIT_DURATION_MS: float(duration_ms),
                sc.TOOLKIT_SUCCESS: success,
                sc.TASK_DEPTH: task.depth if task is not None else 0,
            }
            if exec_id is not None:
                attrs[sc.EXECUTION_ID] = exec_id
            if error is not None:
                attrs[sc.TOOLKIT_ERROR] = error[:2000]
            span = tel.tracer.start_span(
                f"{sc.SPAN_TOOLKIT_PREFIX} {operation} {toolkit_class}",
                kind=SpanKind.INTERNAL,
                attributes=attrs,
                start_time=end_ns - int(duration_ms * 1e6),
            )
            span.set_status(Status(StatusCode.OK) if success else Status(StatusCode.ERROR, error or ""))
            span.end(end_time=end_ns)
        labels = {
            sc.L_OPERATION: operation,
            sc.L_TOOLKIT_CLASS: toolkit_class,
            sc.L_SUCCESS: str(success).lower(),
        }
        tel.toolkit_events.add(1, labels)
        tel.toolkit_duration.record(float(duration_ms), labels)
        if ctx is not None:
            ctx.add_toolkit_event(
                ToolkitEvent(
                    execution_id=ctx.execution_id,
                    timestamp=datetime.fromtimestamp(end_ns / 1e9 - duration_ms / 1000.0, UTC),
                    operation=operation,
                    toolkit_class=toolkit_class,
                    duration_ms=float(duration_ms),
                    success=success,
                    error=error,
                    metadata=dict(metadata or {}),
                )
            )
    except Exception as exc:
        tel.internal_error("record_toolkit_event", exc)


@contextmanager
def toolkit_operation(
    operation: str, toolkit_class: str, metadata: dict[str, Any] | None = None
) -> Iterator[None]:
    """Time a block as one lifecycle event; an exception marks it failed and propagates unchanged."""
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        record_toolkit_event(
            operation, toolkit_class, duration_ms=(time.perf_counter() - start) * 1000.0, success=False,
            error=f"{type(exc).__name__}: {exc}", metadata=metadata,
        )  # fmt: skip
        raise
    record_toolkit_event(
        operation, toolkit_class, duration_ms=(time.perf_counter() - start) * 1000.0, metadata=metadata
    )


# --- ROMA's ToolkitManager -----------------------------------------------------------------------
def _class_name(config: Any) -> str:
    return str(getattr(config, "class_name", None) or type(config).__name__)


def _wrap_create(original: Any) -> Any:
    @functools.wraps(original)
    def _create_toolkit_instance(self: Any, *args: Any, **kwargs: Any) -> Any:
        class_name = kwargs.get("class_name", args[0] if args else "unknown")
        with toolkit_operation("create", str(class_name)):
            return original(self, *args, **kwargs)

    return _create_toolkit_instance


def _cache_lookups(manager: Any, execution_id: str, configs: Any) -> None:
    """Before ROMA resolves toolkits, say which configs its cache will serve and which it will miss."""
    cache = getattr(manager, "_toolkit_cache", None)
    key_of = getattr(manager, "_get_toolkit_cache_key", None)
    if cache is None or key_of is None or not configs:
        return
    for config in configs:
        if not getattr(config, "enabled", True):
            continue
        name = _class_name(config)
        start = time.perf_counter()
        hit = key_of(execution_id, name, config) in cache
        record_toolkit_event(
            "cache_hit" if hit else "cache_miss", name, duration_ms=(time.perf_counter() - start) * 1000.0
        )


def _before_get_tools(manager: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        execution_id = kwargs.get("execution_id", args[0] if args else None)
        configs = kwargs.get("toolkit_configs", args[2] if len(args) > 2 else None)
        if execution_id and telemetry.ACTIVE is not None:
            _cache_lookups(manager, str(execution_id), configs)
    except Exception as exc:
        if telemetry.ACTIVE is not None:
            telemetry.ACTIVE.internal_error("toolkit_manager.cache_lookup", exc)


def _wrap_get_tools(original: Any) -> Any:
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def get_tools_for_execution(self: Any, *args: Any, **kwargs: Any) -> Any:
            _before_get_tools(self, args, kwargs)
            return await original(self, *args, **kwargs)

        return get_tools_for_execution

    @functools.wraps(original)
    def get_tools_for_execution_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        _before_get_tools(self, args, kwargs)
        return original(self, *args, **kwargs)

    return get_tools_for_execution_sync


def _classes_of(manager: Any, execution_id: str) -> list[str]:
    keys = (getattr(manager, "_execution_toolkit_map", None) or {}).get(execution_id)
    if keys is None:
        keys = [
            k for k in (getattr(manager, "_toolkit_cache", None) or {}) if k.startswith(f"{execution_id}:")
        ]
    return sorted({str(k).split(":")[1] for k in keys if str(k).count(":") >= 2})


def _wrap_cleanup(original: Any) -> Any:
    def record(classes: list[str], start: float, exc: BaseException | None) -> None:
        duration = (time.perf_counter() - start) * 1000.0
        for name in classes or ["*"]:
            record_toolkit_event(
                "cleanup", name, duration_ms=duration, success=exc is None,
                error=None if exc is None else f"{type(exc).__name__}: {exc}",
            )  # fmt: skip

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def cleanup_execution(self: Any, execution_id: str, *args: Any, **kwargs: Any) -> Any:
            classes = _classes_of(self, str(execution_id))
            start = time.perf_counter()
            try:
                result = await original(self, execution_id, *args, **kwargs)
            except BaseException as exc:
                record(classes, start, exc)
                raise
            record(classes, start, None)
            return result

        return cleanup_execution

    @functools.wraps(original)
    def cleanup_execution_sync(self: Any, execution_id: str, *args: Any, **kwargs: Any) -> Any:
        classes = _classes_of(self, str(execution_id))
        start = time.perf_counter()
        try:
            result = original(self, execution_id, *args, **kwargs)
        except BaseException as exc:
            record(classes, start, exc)
            raise
        record(classes, start, None)
        return result

    return cleanup_execution_sync


def instrument_toolkit_manager(patcher: Patcher, manager_cls: type) -> None:
    patcher.wrap_function(manager_cls, "_create_toolkit_instance", _wrap_create)
    patcher.wrap_function(manager_cls, "get_tools_for_execution", _wrap_get_tools)
    patcher.wrap_function(manager_cls, "cleanup_execution", _wrap_cleanup)

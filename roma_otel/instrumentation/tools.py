"""``execute_tool`` spans and the tool metrics, for ``dspy.Tool`` calls and toolkit methods.

A toolkit is a class marked with ``@roma_otel.toolkit`` or a subclass of a configured base class
(ROMA's ``BaseToolkit``). Its tool methods are wrapped on the class, so bound methods handed to DSPy,
ROMA's own registry wrappers and direct calls are all seen. When ``dspy.Tool`` calls such a method
it defers to the method's wrapper, so each call is one span and is counted once. A configured base
class is never imported by roma-otel: its module is hooked when the program imports it, if it has not.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import sys
import threading
import time
import types
import weakref
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from roma_otel import semconv as sc
from roma_otel import telemetry
from roma_otel.compat.dspy import REACT_MODULES, REACT_SENTINEL_QUALNAMES
from roma_otel.context import _EXECUTION, _TASK, ToolInvocation
from roma_otel.instrumentation.modules import current_module_label
from roma_otel.instrumentation.patching import Patcher, all_subclasses, install_subclass_hook
from roma_otel.telemetry import Telemetry, enabled_context, mark_error, to_json

__all__ = ["FUNCTION_TOOLKIT", "instrument_tools", "payload_size", "toolkit"]

logger = logging.getLogger("roma_otel")

FUNCTION_TOOLKIT = "dspy.Tool"  # toolkit_class of a plain function handed to dspy.Tool
TOOL_MARK = "_roma_otel_tool"
_TOOLKIT_MARK = "__roma_otel_toolkit__"

T = TypeVar("T", bound=type)

# Classes marked with @toolkit, with their explicit tool list (None: every public method).
_DECORATED: weakref.WeakKeyDictionary[type, tuple[str, ...] | None] = weakref.WeakKeyDictionary()
_DECORATED_LOCK = threading.Lock()
_ACTIVE_PATCHER: Patcher | None = None

# The toolkit instance whose tool is running: a tool calling a sibling tool is one invocation.
_TOOL: ContextVar[Any] = ContextVar("roma_otel_tool", default=None)


def payload_size(value: Any) -> int:
    """Size in bytes of a tool input or output as it would travel: UTF-8 text or JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    try:
        return len(to_json(value).encode("utf-8"))
    except Exception:
        return len(repr(value).encode("utf-8"))


def _input_payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args:
        return kwargs
    if not kwargs and len(args) == 1:
        return args[0]
    return {"args": list(args), **kwargs}


def _enter(
    tel: Telemetry,
    current: otel_context.Context,
    toolkit_class: str,
    tool_name: str,
    owner: Any,
    args: tuple[Any, ...],
    kwargs: dict,
) -> tuple[Any, ...]:
    sampled = tel.sample_tool()
    span = None
    otel_token = None
    ctx = _EXECUTION.get()
    if sampled and not tel.skip_span(current):
        task = _TASK.get()
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_EXECUTE_TOOL,
            sc.GEN_AI_TOOL_NAME: tool_name,
            sc.TOOLKIT_CLASS: toolkit_class,
            sc.MODULE: current_module_label(),
            sc.TASK_DEPTH: task.depth if task is not None else 0,
        }
        if ctx is not None:
            attrs[sc.EXECUTION_ID] = ctx.execution_id
        if task is not None and task.task_id is not None:
            attrs[sc.TASK_ID] = task.task_id
        if tel.genai_latest:
            attrs[sc.GEN_AI_TOOL_TYPE] = sc.TOOL_TYPE_FUNCTION
        span = tel.start_span(f"{sc.SPAN_TOOL_PREFIX} {tool_name}", SpanKind.INTERNAL, attrs, current)
        otel_token = otel_context.attach(trace.set_span_in_context(span, current))
    input_size = payload_size(_input_payload(args, kwargs)) if sampled else 0
    if sampled and span is not None and tel.redactor is not None and span.is_recording():
        span.set_attribute(sc.GEN_AI_TOOL_CALL_ARGUMENTS, tel.redactor.render(_input_payload(args, kwargs)))
    return (
        _TOOL.set(owner), otel_token, span, sampled, ctx, toolkit_class, tool_name, input_size,
        time.time(), time.perf_counter_ns(),
    )  # fmt: skip


def _exit(tel: Telemetry, state: tuple[Any, ...], exc: BaseException | None, result: Any) -> None:
    tool_token, otel_token, span, sampled, ctx, toolkit_class, tool_name, input_size, wall, start = state
    try:
        # Whole nanoseconds over 1e6: the float of a short decimal, which prints (and copies) in half the time.
        duration_ms = (time.perf_counter_ns() - start) / 1e6
        labels = {sc.L_TOOLKIT_CLASS: toolkit_class, sc.L_TOOL_NAME: tool_name}
        tel.tool_invocations.add(1, labels)
        tel.tool_duration.record(duration_ms, labels, span)
        error_type = None
        if exc is None:
            tel.tool_success.add(1, labels)
        else:
            error_type = type(exc).__qualname__
            tel.tool_failed.add(1, {**labels, sc.L_ERROR_TYPE: error_type})
        if sampled:
            output_size = payload_size(result) if exc is None else 0
            if span is not None and span.is_recording():
                tel.set_attributes(
                    span,
                    {
                        sc.TOOL_INPUT_SIZE: input_size,
                        sc.TOOL_OUTPUT_SIZE: output_size,
                        sc.TOOL_SUCCESS: exc is None,
                        sc.TOOL_DURATION_MS: duration_ms,
                    }
                )
                if exc is not None:
                    mark_error(span, exc)
                else:
                    span.set_status(Status(StatusCode.OK))
                    if tel.redactor is not None:
                        span.set_attribute(sc.GEN_AI_TOOL_CALL_RESULT, tel.redactor.render(result))
            if ctx is not None:
                ctx.add_tool_invocation(
                    ToolInvocation(
                        execution_id=ctx.execution_id,
                        toolkit_class=toolkit_class,
                        tool_name=tool_name,
                        invoked_at=datetime.fromtimestamp(wall, UTC),
                        duration_ms=duration_ms,
                        input_size_bytes=input_size,
                        output_size_bytes=output_size,
                        success=exc is None,
                        error=None if exc is None else str(exc)[:2000],
                        metadata={} if error_type is None else {"error_type": error_type},
                    )
                )
    except Exception as err:
        tel.internal_error("tool.exit", err)
    finally:
        if span is not None:
            span.end()
        if otel_token is not None:
            otel_context.detach(otel_token)
        _TOOL.reset(tool_token)


def _run_sync(
    original: Any, toolkit_class: str, tool_name: str, owner: Any, args: tuple, kwargs: dict, call: Any
) -> Any:
    tel = telemetry.ACTIVE
    if tel is None or not tel.track_invocations:
        return call()
    current = enabled_context()
    if current is None:
        return call()
    try:
        state = _enter(tel, current, toolkit_class, tool_name, owner, args, kwargs)
    except Exception as err:
        tel.internal_error("tool.enter", err)
        return call()
    try:
        result = call()
    except BaseException as exc:
        _exit(tel, state, exc, None)
        raise
    _exit(tel, state, None, result)
    return result


async def _run_async(
    original: Any, toolkit_class: str, tool_name: str, owner: Any, args: tuple, kwargs: dict, call: Any
) -> Any:
    tel = telemetry.ACTIVE
    if tel is None or not tel.track_invocations:
        return await call()
    current = enabled_context()
    if current is None:
        return await call()
    try:
        state = _enter(tel, current, toolkit_class, tool_name, owner, args, kwargs)
    except Exception as err:
        tel.internal_error("tool.enter", err)
        return await call()
    try:
        result = await call()
    except BaseException as exc:
        _exit(tel, state, exc, None)
        raise
    _exit(tel, state, None, result)
    return result


# --- toolkit methods ------------------------------------------------------------------------------
def _method_wrapper(name: str) -> Any:
    def make(original: Any) -> Any:
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def async_tool(self: Any, *args: Any, **kwargs: Any) -> Any:
                if _TOOL.get() is self:
                    return await original(self, *args, **kwargs)
                return await _run_async(
                    original, type(self).__name__, name, self, args, kwargs,
                    lambda: original(self, *args, **kwargs),
                )  # fmt: skip

            setattr(async_tool, TOOL_MARK, True)
            return async_tool

        @functools.wraps(original)
        def tool(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _TOOL.get() is self:
                return original(self, *args, **kwargs)
            return _run_sync(
                original, type(self).__name__, name, self, args, kwargs,
                lambda: original(self, *args, **kwargs),
            )  # fmt: skip

        setattr(tool, TOOL_MARK, True)
        return tool

    return make


def _tool_names(cls: type, excluded: frozenset[str], only: tuple[str, ...] | None) -> list[str]:
    names = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") or name in excluded:
            continue
        if only is not None and name not in only:
            continue
        if inspect.isfunction(value):
            names.append(name)
    return names


def _wrap_toolkit_class(patcher: Patcher, cls: type, excluded: frozenset[str], only: tuple[str, ...] | None) -> None:
    for name in _tool_names(cls, excluded, only):
        patcher.wrap_function(cls, name, _method_wrapper(name))


def _instrument_tree(patcher: Patcher, root: type, *, include_root: bool, only: tuple[str, ...] | None) -> None:
    # Methods of a configured base class (BaseToolkit's own helpers) are not tools.
    excluded = frozenset() if include_root else frozenset(dir(root))
    classes = [root, *all_subclasses(root)] if include_root else all_subclasses(root)
    for cls in classes:
        _wrap_toolkit_class(patcher, cls, excluded, only)
    install_subclass_hook(patcher, root, lambda cls: _wrap_toolkit_class(patcher, cls, excluded, only))


def toolkit(cls: T | None = None, *, tools: tuple[str, ...] | list[str] | None = None) -> Any:
    """Mark a class as a toolkit: its public methods (or just ``tools``) become traced tools.

    Works before or after ``instrument()``; subclasses of a marked class are toolkits too.
    """

    def mark(target: T) -> T:
        only = tuple(tools) if tools is not None else None
        with _DECORATED_LOCK:
            _DECORATED[target] = only
        setattr(target, _TOOLKIT_MARK, True)
        patcher = _ACTIVE_PATCHER
        if patcher is not None:
            _instrument_tree(patcher, target, include_root=True, only=only)
        return target

    return mark(cls) if cls is not None else mark


def _instrument_base(patcher: Patcher, path: str, module: types.ModuleType) -> None:
    base = getattr(module, path.rpartition(".")[2], None)
    if not isinstance(base, type):
        logger.warning("roma-otel: toolkit base class %s not found in its module", path)
        return
    _instrument_tree(patcher, base, include_root=False, only=None)


def _hook_base_class(patcher: Patcher, path: str) -> None:
    """Instrument ``path``'s subclasses now if its module is imported, else when the program imports it."""
    module_name = path.rpartition(".")[0]
    top = module_name.partition(".")[0]
    try:
        if top not in sys.modules and importlib.util.find_spec(top) is None:  # finding imports nothing
            return
    except (ImportError, ValueError):
        return
    patcher.when_imported(
        module_name, functools.partial(_instrument_base, patcher, path), top, f"tool spans for {path} subclasses"
    )


# --- dspy.Tool ------------------------------------------------------------------------------------
def _tool_identity(tool: Any) -> tuple[str, str]:
    func = tool.func
    owner = getattr(func, "__self__", None)
    toolkit_class = type(owner).__name__ if owner is not None and not inspect.isclass(owner) else FUNCTION_TOOLKIT
    return toolkit_class, str(getattr(tool, "name", None) or getattr(func, "__name__", "tool"))


def _not_traced(func: Any) -> bool:
    """A toolkit method (its own wrapper makes the span) or ReAct's ``finish`` sentinel, which is no tool.

    Only the sentinel: tools DSPy builds from MCP or LangChain tools also live in dspy's modules and are
    real tool calls.
    """
    if getattr(func, TOOL_MARK, False):
        return True
    return getattr(func, "__module__", None) in REACT_MODULES and str(getattr(func, "__qualname__", "")).startswith(
        REACT_SENTINEL_QUALNAMES
    )


def _dspy_tool_sync(original: Any) -> Any:
    @functools.wraps(original)
    def __call__(self: Any, **kwargs: Any) -> Any:
        if _not_traced(self.func):
            return original(self, **kwargs)
        toolkit_class, name = _tool_identity(self)
        return _run_sync(original, toolkit_class, name, None, (), kwargs, lambda: original(self, **kwargs))

    return __call__


def _dspy_tool_async(original: Any) -> Any:
    @functools.wraps(original)
    async def acall(self: Any, **kwargs: Any) -> Any:
        if _not_traced(self.func):
            return await original(self, **kwargs)
        toolkit_class, name = _tool_identity(self)
        return await _run_async(original, toolkit_class, name, None, (), kwargs, lambda: original(self, **kwargs))

    return acall


def instrument_tools(patcher: Patcher, base_class_paths: tuple[str, ...]) -> None:
    global _ACTIVE_PATCHER
    from roma_otel.compat.dspy import tool_class

    tool = tool_class()
    if tool is not None:
        patcher.wrap_function(tool, "__call__", _dspy_tool_sync)
        patcher.wrap_function(tool, "acall", _dspy_tool_async)
    for path in base_class_paths:
        _hook_base_class(patcher, path)
    with _DECORATED_LOCK:
        decorated = list(_DECORATED.items())
    # Roots only: a decorated subclass of a decorated class is covered by its parent's tree.
    roots = [c for c, _ in decorated if not any(o is not c and issubclass(c, o) for o, _ in decorated)]
    for cls, only in decorated:
        if cls in roots:
            _instrument_tree(patcher, cls, include_root=True, only=only)
    _ACTIVE_PATCHER = patcher


def uninstrument_tools() -> None:
    global _ACTIVE_PATCHER
    _ACTIVE_PATCHER = None

"""Spans for DSPy module calls: one per call, however the module is entered.

``forward``/``aforward`` are wrapped on ``dspy.Module`` and every subclass (existing ones at
``instrument()``, later ones through ``__init_subclass__``), because ROMA's ``BaseModule.__call__`` and
its runtime call ``forward``/``aforward`` directly and never reach ``Module.__call__``. A call nested in
a call on the same instance (``__call__`` -> ``forward``, ``super().forward()``) makes no second span.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from roma_otel import semconv as sc
from roma_otel import telemetry
from roma_otel.context import _EXECUTION, _TASK, ExecutionContext, TaskScope
from roma_otel.instrumentation import content
from roma_otel.instrumentation.executions import execution_attributes, finish_execution, mark_agent, new_id
from roma_otel.instrumentation.patching import Patcher, all_subclasses, install_subclass_hook
from roma_otel.telemetry import Telemetry, enabled_context, mark_error

__all__ = ["UNATTRIBUTED", "ModuleFrame", "current_module_instance", "current_module_label", "instrument_modules"]

UNATTRIBUTED = "unattributed"
_METHODS = ("forward", "aforward")


# The innermost module call: (its instance, for de-duplication; the label LM usage goes to; whether that
# label is a ROMA role). A plain tuple: one is made per module call, and a class costs ~0.3 µs more.
ModuleFrame = tuple[Any, str, bool]

_MODULE: ContextVar[ModuleFrame | None] = ContextVar("roma_otel_module", default=None)

# class -> (own label, qualified name, has a ROMA role, defined inside dspy)
_CLASS_INFO: dict[type, tuple[str, str, bool, bool]] = {}


def class_info(cls: type) -> tuple[str, str, bool, bool]:
    info = _CLASS_INFO.get(cls)
    if info is None:
        role = next((c.__name__.lower() for c in cls.__mro__ if c.__name__.lower() in sc.ROLES), None)
        info = (
            role or cls.__name__,
            f"{cls.__module__}.{cls.__qualname__}",
            role is not None,
            cls.__module__.startswith("dspy."),
        )
        _CLASS_INFO[cls] = info
    return info


def current_module_label() -> str:
    frame = _MODULE.get()
    return frame[1] if frame is not None else UNATTRIBUTED


def current_module_instance() -> Any:
    """The module whose call is innermost here, or None."""
    frame = _MODULE.get()
    return frame[0] if frame is not None else None


def _root_attributes(
    ctx: ExecutionContext, own: str, qualname: str, task: TaskScope | None, agent: bool
) -> dict[str, Any]:
    """The start attributes of a module span that is its execution's root."""
    attrs = execution_attributes(ctx)
    attrs[sc.MODULE] = own
    attrs[sc.MODULE_CLASS] = qualname
    if task is not None and task.task_id is not None:
        attrs[sc.TASK_ID] = task.task_id
    return mark_agent(attrs, own) if agent else attrs


def _enter(
    tel: Telemetry,
    instance: Any,
    parent: ModuleFrame | None,
    current: otel_context.Context,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, ...]:
    own, qualname, has_role, builtin = class_info(type(instance))
    # The latest GenAI conventions (opt-in) make a ROMA role's call an agent invocation.
    agent = has_role and tel.genai_latest
    # LM usage goes to the nearest ROMA role, else to the program's own module rather than to the
    # DSPy building block (Predict, ChainOfThought) it happens to run through.
    if has_role or parent is None or not (builtin or parent[2]):
        module_token = _MODULE.set((instance, own, has_role))
    else:
        module_token = _MODULE.set((instance, parent[1], parent[2]))

    ctx = _EXECUTION.get()
    exec_token = None
    span = None
    otel_token = None
    pending = None
    captured = None
    try:
        if ctx is None:
            # No task text: a solver run inside this call may still supply the goal (see executions._begin).
            ctx = ExecutionContext(new_id(), None, None, None, tel.config_version, True)
            ctx.inputs = kwargs if not args else {"args": args, **kwargs}
            exec_token = _EXECUTION.set(ctx)
        task = _TASK.get()
        if exec_token is not None:
            try:
                span, pending = tel.start_root_span(
                    _span_name(instance, own, agent), ctx, current, _root_attributes, ctx, own, qualname, task, agent
                )
            finally:
                ctx.root_started = True  # also when the start failed: no later span is taken for the root
            otel_token = otel_context.attach(trace.set_span_in_context(span, current))
        elif not tel.skip_span(current):
            attrs = {
                sc.MODULE: own,
                sc.MODULE_CLASS: qualname,
                sc.EXECUTION_ID: ctx.execution_id,
                sc.TASK_DEPTH: task.depth if task is not None else 0,
            }
            if task is not None and task.task_id is not None:
                attrs[sc.TASK_ID] = task.task_id
            if agent:
                mark_agent(attrs, own)
            span = tel.start_span(_span_name(instance, own, agent), SpanKind.INTERNAL, attrs, current)
            otel_token = otel_context.attach(trace.set_span_in_context(span, current))
        if span is not None and tel.redactor is not None:
            captured = content.input_attributes(tel, content.call_inputs(args, kwargs), has_role)
    except BaseException:
        # The call goes on uninstrumented (see the wrappers): leave no context or span of ours behind.
        if span is not None:
            span.end()
        if exec_token is not None:
            _EXECUTION.reset(exec_token)
        _MODULE.reset(module_token)
        raise
    return module_token, exec_token, ctx, span, otel_token, pending, captured, has_role


def _span_name(instance: Any, own: str, agent: bool) -> str:
    return f"{sc.OP_INVOKE_AGENT} {own}" if agent else type(instance).__name__


def _exit(tel: Telemetry, state: tuple[Any, ...], exc: BaseException | None, result: Any = None) -> None:
    module_token, exec_token, ctx, span, otel_token, pending, captured, has_role = state
    try:
        if span is not None and exc is not None:
            mark_error(span, exc)
        if captured is not None and span.is_recording():  # captured: content capture is on
            if exc is None:
                captured.update(content.output_attributes(tel, result, has_role))
            if pending is not None:
                pending.update(captured)
            else:
                tel.set_attributes(span, captured)
        if exec_token is not None:
            if exc is None:
                ctx.output = result
            finish_execution(tel, ctx, span, exc is not None, pending)
    except Exception as err:
        tel.internal_error("module.exit", err)
    finally:
        if span is not None:
            span.end()
        if otel_token is not None:
            otel_context.detach(otel_token)
        if exec_token is not None:
            _EXECUTION.reset(exec_token)
        _MODULE.reset(module_token)


def _sync_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        tel = telemetry.ACTIVE
        parent = _MODULE.get()
        if tel is None or (parent is not None and parent[0] is self):
            return original(self, *args, **kwargs)
        current = enabled_context()
        if current is None:
            return original(self, *args, **kwargs)
        try:
            state = _enter(tel, self, parent, current, args, kwargs)
        except Exception as err:
            tel.internal_error("module.enter", err)
            return original(self, *args, **kwargs)
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            _exit(tel, state, exc)
            raise
        _exit(tel, state, None, result)
        return result

    return forward


def _async_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    async def aforward(self: Any, *args: Any, **kwargs: Any) -> Any:
        tel = telemetry.ACTIVE
        parent = _MODULE.get()
        if tel is None or (parent is not None and parent[0] is self):
            return await original(self, *args, **kwargs)
        current = enabled_context()
        if current is None:
            return await original(self, *args, **kwargs)
        try:
            state = _enter(tel, self, parent, current, args, kwargs)
        except Exception as err:
            tel.internal_error("module.enter", err)
            return await original(self, *args, **kwargs)
        try:
            result = await original(self, *args, **kwargs)
        except BaseException as exc:
            _exit(tel, state, exc)
            raise
        _exit(tel, state, None, result)
        return result

    return aforward


def _wrap_class(patcher: Patcher, cls: type) -> None:
    patcher.wrap_function(cls, "forward", _sync_wrapper)
    patcher.wrap_function(cls, "aforward", _async_wrapper)


def instrument_modules(patcher: Patcher) -> None:
    from roma_otel.compat.dspy import module_class

    base = module_class()
    if base is None:
        return
    for cls in (base, *all_subclasses(base)):
        _wrap_class(patcher, cls)
    install_subclass_hook(patcher, base, lambda cls: _wrap_class(patcher, cls))

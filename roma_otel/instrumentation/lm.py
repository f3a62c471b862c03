"""GenAI spans and usage metrics for DSPy LM calls (``BaseLM.__call__`` / ``acall``).

The span wraps the public call; the numbers come from DSPy's own result for this call, caught where the
installed DSPy hands it on (``compat.dspy``: ``execution.finalize`` on 3.4, ``_finalize_lm_response`` /
``_process_lm_response`` before): usage, the provider's cost and the cache-hit flag exactly as DSPy saw
them, without reading ``lm.history`` (which threads share and users can disable).
"""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from roma_otel import semconv as sc
from roma_otel import telemetry
from roma_otel.compat import dspy as dspy_compat
from roma_otel.context import _EXECUTION, _TASK
from roma_otel.cost import UNKNOWN, compute_cost
from roma_otel.instrumentation import content
from roma_otel.instrumentation.modules import current_module_label
from roma_otel.instrumentation.patching import Patcher, all_subclasses, install_subclass_hook
from roma_otel.telemetry import Telemetry, enabled_context, mark_error

__all__ = ["instrument_lm"]


class _Call:
    """One LM call in flight; ``finalize`` fills ``result``."""

    __slots__ = ("lm", "result")

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.result: Any = None


_CALL: ContextVar[_Call | None] = ContextVar("roma_otel_lm_call", default=None)

# model string -> (operation-independent) provider, request model
_MODEL_INFO: dict[str, tuple[str, str]] = {}


def _model_info(model: str) -> tuple[str, str]:
    info = _MODEL_INFO.get(model)
    if info is None:
        provider, sep, name = model.partition("/")
        info = (provider, name) if sep else ("openai", model)
        if len(_MODEL_INFO) < 4096:
            _MODEL_INFO[model] = info
    return info


def _operation(lm: Any) -> str:
    return sc.OP_TEXT_COMPLETION if getattr(lm, "model_type", "chat") == "text" else sc.OP_CHAT


def _enter(tel: Telemetry, current: otel_context.Context, lm: Any, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    model = str(getattr(lm, "model", None) or type(lm).__name__)
    provider, request_model = _model_info(model)
    op = _operation(lm)
    call = _Call(lm)
    call_token = _CALL.set(call)
    span = None
    otel_token = None
    if not tel.skip_span(current):
        ctx = _EXECUTION.get()
        task = _TASK.get()
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: op,
            sc.GEN_AI_PROVIDER_NAME: provider,
            sc.GEN_AI_REQUEST_MODEL: request_model,
            sc.MODULE: current_module_label(),
            sc.TASK_DEPTH: task.depth if task is not None else 0,
        }
        if ctx is not None:
            attrs[sc.EXECUTION_ID] = ctx.execution_id
        if task is not None and task.task_id is not None:
            attrs[sc.TASK_ID] = task.task_id
        lm_kwargs = getattr(lm, "kwargs", None) or {}
        temperature = kwargs.get("temperature", lm_kwargs.get("temperature"))
        if isinstance(temperature, int | float):
            attrs[sc.GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
        max_tokens = kwargs.get("max_tokens", lm_kwargs.get("max_tokens"))
        if isinstance(max_tokens, int):
            attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        span = tel.start_span(f"{op} {request_model}", SpanKind.CLIENT, attrs, current)
        otel_token = otel_context.attach(trace.set_span_in_context(span, current))
    return call_token, call, span, otel_token, model, provider, request_model, op, time.perf_counter()


class _Labels:
    """Every label set one kind of LM call records under, built once per (module, model, …) combination:
    an LM call then records its six metrics without building a dict or a frozenset."""

    __slots__ = ("calls", "genai", "genai_in", "genai_out", "labels", "labels_key", "tokens_in", "tokens_out")

    def __init__(
        self, module: str, model: str, op: str, provider: str, request_model: str, response_model: Any, cache_hit: bool
    ) -> None:
        self.labels = {sc.L_MODULE: module, sc.L_MODEL: model}
        self.labels_key = frozenset(self.labels.items())
        self.calls = frozenset({**self.labels, sc.L_CACHE_HIT: str(cache_hit).lower()}.items())
        self.tokens_in = frozenset({**self.labels, sc.L_TOKEN_TYPE: sc.TOKEN_TYPE_INPUT}.items())
        self.tokens_out = frozenset({**self.labels, sc.L_TOKEN_TYPE: sc.TOKEN_TYPE_OUTPUT}.items())
        genai: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: op,
            sc.GEN_AI_PROVIDER_NAME: provider,
            sc.GEN_AI_REQUEST_MODEL: request_model,
        }
        if response_model:
            genai[sc.GEN_AI_RESPONSE_MODEL] = str(response_model)
        # Shared by every call of this kind: never mutated (the error variant is a copy).
        self.genai = genai
        self.genai_in = {**genai, sc.GEN_AI_TOKEN_TYPE: sc.TOKEN_TYPE_INPUT}
        self.genai_out = {**genai, sc.GEN_AI_TOKEN_TYPE: sc.TOKEN_TYPE_OUTPUT}


_LABELS: dict[tuple[Any, ...], _Labels] = {}


def _labels(*key: Any) -> _Labels:
    found = _LABELS.get(key)
    if found is None:
        found = _Labels(*key)
        if len(_LABELS) < 4096:  # bounded like the label values themselves; past it, built per call
            _LABELS[key] = found
    return found


def _usage(attrs: dict[str, Any]) -> dict[str, Any]:
    keys = (sc.GEN_AI_USAGE_INPUT_TOKENS, sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.GEN_AI_RESPONSE_FINISH_REASONS)
    return {k: attrs[k] for k in keys if k in attrs}


def _tokens(usage: dict[str, Any], key: str) -> int | None:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _exit(tel: Telemetry, state: tuple[Any, ...], exc: BaseException | None, messages: Any, outputs: Any) -> None:
    call_token, call, span, otel_token, model, provider, request_model, op, start = state
    try:
        latency_s = time.perf_counter() - start
        latency_ms = latency_s * 1000.0
        module = current_module_label()
        result = dspy_compat.resolve(call.result)
        error_type = mark_error(span, exc) if exc is not None else None

        cache_hit = bool(getattr(result, "cache_hit", False)) if result is not None else False
        usage = getattr(result, "usage", None) or {}
        input_tokens = _tokens(usage, "prompt_tokens")
        output_tokens = _tokens(usage, "completion_tokens")
        response_model = getattr(result, "response_model", None) if result is not None else None
        if result is not None:
            # OpenRouter reports its pass-through price in usage.cost; litellm in response_cost.
            provider_cost = usage.get("cost")
            if provider_cost is None:
                provider_cost = getattr(result, "cost", None)
            try:
                cost = compute_cost(
                    model, input_tokens, output_tokens, provider_cost=provider_cost, cache_hit=cache_hit
                )
            except Exception as err:  # pricing must never cost the span or the other figures
                tel.internal_error("lm.cost", err)
                cost = UNKNOWN
        else:
            cost = None
        in_tok = input_tokens or 0
        out_tok = output_tokens or 0
        ls = _labels(module, model, op, provider, request_model, response_model, cache_hit)

        if span is not None and span.is_recording():
            attrs: dict[str, Any] = {sc.LM_CACHE_HIT: cache_hit, sc.LM_LATENCY_MS: latency_ms}
            if input_tokens is not None:
                attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
            if output_tokens is not None:
                attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
            if input_tokens is not None or output_tokens is not None:
                attrs[sc.LM_TOTAL_TOKENS] = in_tok + out_tok
            if response_model:
                attrs[sc.GEN_AI_RESPONSE_MODEL] = str(response_model)
            if cost is not None:
                attrs[sc.LM_COST_SOURCE] = cost.source
                if cost.usd is not None:
                    attrs[sc.LM_COST_USD] = cost.usd
            if tel.redactor is not None or tel.genai_latest or tel.content_events is not None:
                reasons = dspy_compat.finish_reasons(call.result)
                if tel.genai_latest and reasons:
                    attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
                if tel.content_events is not None:
                    base = {**ls.genai, **_usage(attrs)}  # the call's operation, provider and models
                    content.emit_inference_event(tel, span, base, messages, outputs, exc is not None, reasons)
                if tel.redactor is not None:
                    attrs.update(content.lm_attributes(tel, messages, outputs, exc is not None, reasons))
            tel.set_attributes(span, attrs)

        tel.lm_calls.add_key(1, ls.calls)
        tel.lm_latency.record(latency_ms, ls.labels, span)
        if result is not None and not cache_hit:
            # A cache hit spent no tokens: it must not show up as usage.
            if input_tokens is not None:
                tel.lm_tokens.add_key(input_tokens, ls.tokens_in)
                tel.genai_tokens.record(input_tokens, ls.genai_in, span)
            if output_tokens is not None:
                tel.lm_tokens.add_key(output_tokens, ls.tokens_out)
                tel.genai_tokens.record(output_tokens, ls.genai_out, span)
        if cost is not None:
            if cost.usd is None:
                tel.lm_cost_unknown.add_key(1, ls.labels_key)
            elif cost.usd:
                tel.lm_cost.add_key(cost.usd, ls.labels_key)
        genai = ls.genai if error_type is None else {**ls.genai, sc.ERROR_TYPE: error_type}
        tel.genai_duration.record(latency_s, genai, span)

        ctx = _EXECUTION.get()
        if ctx is not None and result is not None:
            ctx.add_lm_call(
                module, 0 if cache_hit else in_tok, 0 if cache_hit else out_tok,
                cost.usd if cost is not None else None, latency_ms,
            )  # fmt: skip
    except Exception as err:
        tel.internal_error("lm.exit", err)
    finally:
        if span is not None:
            span.end()
        if otel_token is not None:
            otel_context.detach(otel_token)
        _CALL.reset(call_token)


def _messages(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    messages = kwargs.get("messages")
    if messages is None:
        messages = kwargs.get("prompt", args[0] if args else None)
    return messages


def _in_call_of(lm: Any) -> bool:
    """True inside a call on this LM already: a subclass's ``__call__`` reaching ``super().__call__``."""
    pending = _CALL.get()
    return pending is not None and pending.lm is lm


def _sync_call(original: Any) -> Any:
    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        tel = telemetry.ACTIVE
        if tel is None or _in_call_of(self):
            return original(self, *args, **kwargs)
        current = enabled_context()
        if current is None:
            return original(self, *args, **kwargs)
        try:
            state = _enter(tel, current, self, kwargs)
        except Exception as err:
            tel.internal_error("lm.enter", err)
            return original(self, *args, **kwargs)
        try:
            outputs = original(self, *args, **kwargs)
        except BaseException as exc:
            _exit(tel, state, exc, _messages(args, kwargs), None)
            raise
        _exit(tel, state, None, _messages(args, kwargs), outputs)
        return outputs

    return __call__


def _async_call(original: Any) -> Any:
    @functools.wraps(original)
    async def acall(self: Any, *args: Any, **kwargs: Any) -> Any:
        tel = telemetry.ACTIVE
        if tel is None or _in_call_of(self):
            return await original(self, *args, **kwargs)
        current = enabled_context()
        if current is None:
            return await original(self, *args, **kwargs)
        try:
            state = _enter(tel, current, self, kwargs)
        except Exception as err:
            tel.internal_error("lm.enter", err)
            return await original(self, *args, **kwargs)
        try:
            outputs = await original(self, *args, **kwargs)
        except BaseException as exc:
            _exit(tel, state, exc, _messages(args, kwargs), None)
            raise
        _exit(tel, state, None, _messages(args, kwargs), outputs)
        return outputs

    return acall


def _capture(lm: Any, captured: Any) -> None:
    """Keep a result hook's capture for the call in flight on ``lm`` (the first one: nested calls)."""
    pending = _CALL.get()
    if pending is not None and pending.lm is lm and pending.result is None:
        pending.result = captured


def instrument_lm(patcher: Patcher) -> None:
    base = dspy_compat.base_lm_class()
    if base is None:
        return

    # BaseLM and every subclass that defines its own entry points (a custom LM, or another
    # instrumentation's wrapper placed on dspy.LM), now and later; nested calls on one LM make one span.
    def wrap(cls: type) -> None:
        patcher.wrap_function(cls, "__call__", _sync_call)
        patcher.wrap_function(cls, "acall", _async_call)

    for cls in (base, *all_subclasses(base)):
        wrap(cls)
    install_subclass_hook(patcher, base, wrap)
    dspy_compat.install_lm_result_hooks(patcher, base, _capture)

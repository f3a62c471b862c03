"""Where each supported DSPy keeps what roma-otel hooks, found by capability, never by version string.

An LM call's usage, provider cost, cache-hit flag and response model reach roma-otel at one of these
points, whichever the installed DSPy has (``lm_result_hooks``):

- ``dspy.clients.execution.finalize(lm, call, result)`` (DSPy 3.4): ``result`` is DSPy's
  ``CallResult``, already holding exactly those four figures;
- ``BaseLM._finalize_lm_response(self, request, response)`` (DSPy 3.3's typed path): ``response`` is
  an ``LMResponse`` (``usage_as_dict()``, ``cost``, ``cache_hit``, ``model``);
- ``BaseLM._process_lm_response(self, response, prompt, messages, **kwargs)`` (DSPy 3.0-3.3's
  legacy path): ``response`` is the provider's response (litellm's ``ModelResponse``: ``usage``,
  ``_hidden_params["response_cost"]``, ``cache_hit`` set by DSPy's cache, ``model``). DSPy 3.0.0-3.0.3's
  cache does not set ``cache_hit`` (it only empties ``usage``), so ``Cache.get`` is wrapped too: a
  response that came out of it is a hit on every version (``track_cache_hits``).

Each becomes an ``LMResult`` with the same four fields, so the LM span reads the same on every
version. The other DSPy classes roma-otel wraps (``Module``, ``BaseLM``, ``Tool``,
``ParallelExecutor``, ``Evaluate``, ``Teleprompter``) are looked up here too, each on its own: one
that is missing or moved degrades only what needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roma_otel.compat import degraded

PACKAGE = "dspy"

# Capture callback: (lm, captured) -> None; lm.py keeps it for the call in flight on that LM, and reads
# it through resolve() when the call ends.
Capture = Callable[[Any, Any], None]


@dataclass(slots=True)
class LMResult:
    """One LM call's figures, as DSPy saw them, whatever shape this DSPy version reports them in."""

    usage: dict[str, Any] = field(default_factory=dict)
    cost: Any = None  # the provider's reported cost in USD, when there is one
    cache_hit: bool = False
    response_model: str | None = None


def result_from_lm_response(response: Any) -> LMResult:
    """DSPy 3.3's ``LMResponse`` (the typed path)."""
    as_dict = getattr(response, "usage_as_dict", None)
    usage = as_dict() if callable(as_dict) else getattr(response, "usage", None)
    return LMResult(
        _plain_usage(usage),
        getattr(response, "cost", None),
        bool(getattr(response, "cache_hit", False)),
        getattr(response, "model", None),
    )


def result_from_provider_response(response: Any) -> LMResult:
    """The provider's own response, as DSPy 3.0-3.3's ``_process_lm_response`` receives it."""
    hidden = getattr(response, "_hidden_params", None)
    cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
    model = getattr(response, "model", None)
    return LMResult(
        _plain_usage(getattr(response, "usage", None)),
        cost,
        bool(getattr(response, "cache_hit", False)),
        model if isinstance(model, str) else None,
    )


def _plain_usage(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if isinstance(usage, dict):
        return usage
    try:
        return dict(usage)  # litellm's Usage and pydantic models iterate as (key, value) pairs
    except (TypeError, ValueError):
        dump = getattr(usage, "model_dump", None)
        return dump() if callable(dump) else {}


# --- the LM result hooks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LMHooks:
    """What the installed DSPy offers for LM results; ``names`` for the notes and the tests."""

    finalize_module: Any = None  # dspy.clients.execution, when it has finalize(lm, call, result)
    finalize_lm_response: bool = False  # BaseLM._finalize_lm_response(self, request, response)
    process_lm_response: bool = False  # BaseLM._process_lm_response(self, response, prompt, messages, ...)

    @property
    def names(self) -> tuple[str, ...]:
        found = []
        if self.finalize_module is not None:
            found.append("execution.finalize")
        if self.finalize_lm_response:
            found.append("BaseLM._finalize_lm_response")
        if self.process_lm_response:
            found.append("BaseLM._process_lm_response")
        return tuple(found)


def detect_lm_hooks(base_lm: type) -> LMHooks:
    """The result hooks this DSPy has. 3.4's ``execution.finalize`` sees every call (its ``__call__``
    imports it at call time), so it is used alone; otherwise both older hooks, the first to see a call's
    result keeping it (3.3's legacy path reaches both)."""
    try:
        execution = importlib.import_module("dspy.clients.execution")
    except ImportError:
        execution = None
    if execution is not None and callable(getattr(execution, "finalize", None)):
        return LMHooks(finalize_module=execution)
    return LMHooks(
        finalize_lm_response=callable(base_lm.__dict__.get("_finalize_lm_response")),
        process_lm_response=callable(base_lm.__dict__.get("_process_lm_response")),
    )


def install_lm_result_hooks(patcher: Any, base_lm: type, capture: Capture) -> LMHooks:
    """Hook every result point the installed DSPy has; report a degradation when there is none."""
    from roma_otel.instrumentation.patching import all_subclasses, install_subclass_hook

    hooks = detect_lm_hooks(base_lm)
    if hooks.finalize_module is not None:
        original = hooks.finalize_module.finalize
        wrapper = _finalize_wrapper(original, capture)
        wrapper._roma_otel_original = original  # type: ignore[attr-defined]
        patcher.replace(hooks.finalize_module, "finalize", wrapper)
        return hooks
    methods: list[tuple[str, int, Callable[[Any], LMResult]]] = []
    if hooks.finalize_lm_response:
        methods.append(("_finalize_lm_response", 1, result_from_lm_response))
    if hooks.process_lm_response:
        methods.append(("_process_lm_response", 0, result_from_provider_response))
        track_cache_hits(patcher)
    if not methods:
        degraded.report(PACKAGE, "LM usage, cost and cache hits (LM spans and call counts are kept)", "no result hook")
        return hooks

    def wrap(cls: type) -> None:
        for name, index, convert in methods:
            patcher.wrap_function(
                cls, name, functools.partial(_method_wrapper, capture=capture, index=index, convert=convert)
            )

    for cls in (base_lm, *all_subclasses(base_lm)):
        wrap(cls)
    install_subclass_hook(patcher, base_lm, wrap)
    return hooks


def _finalize_wrapper(original: Any, capture: Capture) -> Any:
    @functools.wraps(original)
    def finalize(lm: Any, call: Any, result: Any) -> Any:
        _safe_capture(capture, lm, result, None)  # a CallResult has LMResult's four fields already
        return original(lm, call, result)

    return finalize


def _method_wrapper(original: Any, capture: Capture, index: int, convert: Callable[[Any], LMResult]) -> Any:
    """Wrap a ``BaseLM`` method whose argument ``response`` is positional ``index`` (after self)."""

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = args[index] if len(args) > index else kwargs.get("response")
        if response is not None:
            cached = _CACHE.last is response
            if cached:
                _CACHE.last = None
            _safe_capture(capture, self, response, _cached_result if cached else convert)
        return original(self, *args, **kwargs)

    return method


class _LastCached(threading.local):
    last: Any = None  # the response this thread's DSPy cache returned last, until an LM hook sees it


_CACHE = _LastCached()


def _cached_result(response: Any) -> LMResult:
    return dataclasses.replace(result_from_provider_response(response), cache_hit=True)


def track_cache_hits(patcher: Any) -> None:
    """Wrap ``dspy.clients.cache.Cache.get`` so a response served from DSPy's cache is known as a hit.

    DSPy's cache returns a fresh copy on every hit, and the LM hook on the same thread sees that very
    object next (no LM call in between), so an identity check is exact; a cache without ``get`` only
    loses the flag on versions whose cache does not set it itself.
    """
    try:
        cache_cls = importlib.import_module("dspy.clients.cache").Cache
    except (ImportError, AttributeError):
        return
    if not callable(cache_cls.__dict__.get("get")):
        return

    def factory(original: Any) -> Any:
        @functools.wraps(original)
        def get(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            if result is not None:
                _CACHE.last = result
            return result

        return get

    patcher.wrap_function(cache_cls, "get", factory)


def _safe_capture(capture: Capture, lm: Any, raw: Any, convert: Callable[[Any], LMResult] | None) -> None:
    try:
        capture(lm, raw if convert is None else _Lazy(raw, convert))
    except Exception as err:  # never raise into DSPy's call
        degraded.report(PACKAGE, "LM usage, cost and cache hits of some calls", err)


class _Lazy:
    """A captured response, converted to an ``LMResult`` only when the span reads it (after the call):
    a nested call that does not keep it costs nothing."""

    __slots__ = ("_convert", "_raw")

    def __init__(self, raw: Any, convert: Callable[[Any], LMResult]) -> None:
        self._raw = raw
        self._convert = convert

    def resolve(self) -> LMResult:
        return self._convert(self._raw)


def finish_reasons(captured: Any) -> list[str]:
    """The provider's finish reason per completion: from DSPy 3.4's ``CallResult`` (its responses, or the
    provider response it keeps) or litellm's response (``choices``, DSPy 3.0-3.3); empty where the captured
    result has neither. Read only when content or the latest conventions need it."""
    raw = captured._raw if isinstance(captured, _Lazy) else captured
    out: list[str] = []
    try:
        responses = getattr(raw, "responses", None)  # DSPy 3.4's CallResult: its typed responses
        if responses:
            return [r.finish_reason for r in responses if isinstance(getattr(r, "finish_reason", None), str)]
        raw = getattr(raw, "raw", None) or raw  # a CallResult made from a provider's response keeps it
        for choice in getattr(raw, "choices", None) or ():
            reason = choice.get("finish_reason") if isinstance(choice, dict) else getattr(choice, "finish_reason", None)
            if isinstance(reason, str):
                out.append(reason)
    except Exception:
        return []
    return out


def resolve(captured: Any) -> Any:
    """What a hook captured, with ``LMResult``'s four fields (None when nothing was)."""
    if captured is None:
        return None
    try:
        return captured.resolve() if isinstance(captured, _Lazy) else captured
    except Exception as err:
        degraded.report(PACKAGE, "LM usage, cost and cache hits of some calls", err)
        return None


# --- the classes roma-otel wraps ---------------------------------------------------------------------


def find(path: str, what: str) -> Any:
    """``module.path:Name`` from the installed DSPy, or None with a degradation naming ``what``."""
    module_name, _, name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        degraded.report(PACKAGE, what, err)
        return None
    return found


def module_class() -> Any:
    return find("dspy:Module", "module spans")


def base_lm_class() -> Any:
    return find("dspy.clients.base_lm:BaseLM", "LM spans")


def tool_class() -> Any:
    return find("dspy.adapters.types.tool:Tool", "dspy.Tool spans (toolkit methods are still traced)")


def parallel_executor_class() -> Any:
    return find("dspy.utils.parallelizer:ParallelExecutor", "trace context across dspy.Parallel worker threads")


def evaluate_class() -> Any:
    return find("dspy.evaluate.evaluate:Evaluate", "MLflow evaluation runs")


def teleprompter_class() -> Any:
    return find("dspy.teleprompt.teleprompt:Teleprompter", "MLflow compile runs")


# ReAct's ``finish`` sentinel tool is no tool call: a lambda defined inside ReAct.__init__ on every
# supported version; ReActV2 (DSPy 3.3 and later, its own module) has ``submit`` from _make_submit_tool.
REACT_MODULES = frozenset({"dspy.predict.react", "dspy.predict.react_v2"})
REACT_SENTINEL_QUALNAMES = ("ReAct.__init__.", "ReActV2._make_submit_tool.")

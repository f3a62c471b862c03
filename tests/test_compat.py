"""roma_otel.compat: every branch of the DSPy and SDK capability checks, and degrading on unknown shapes.

The installed DSPy takes one LM result hook for real (the contract test and the LM tests run it); the
other branches run here on classes shaped like the other DSPy versions, so every cell checks all of them.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import types
from typing import Any

import dspy
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import REGISTRY, CollectorRegistry

from roma_otel import semconv as sc
from roma_otel.compat import degraded
from roma_otel.compat import dspy as dspy_compat
from roma_otel.compat import otel as otel_compat
from roma_otel.instrumentation.patching import Patcher
from tests.conftest import answer_lm

LM_SPAN = "chat gpt-4o-mini"


@pytest.fixture(autouse=True)
def _clean_degradations() -> Any:
    degraded.clear()
    yield
    degraded.clear()


# --- DSPy: the LM result hooks ------------------------------------------------------------------------


class _Usage(dict):
    pass


def _provider_response(cache_hit: bool = False) -> Any:
    """Shaped like litellm's ModelResponse as DSPy 3.0-3.3 hand it to _process_lm_response."""
    response = types.SimpleNamespace(usage=_Usage(prompt_tokens=11, completion_tokens=4), model="gpt-4o-mini-2024")
    response._hidden_params = {"response_cost": 0.00012}
    if cache_hit:
        response.cache_hit = True
    return response


def _legacy_base() -> type:
    """A BaseLM shaped like DSPy 3.0-3.2: __call__ -> forward, then _process_lm_response."""

    class LegacyBaseLM:
        def __call__(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
            return self._process_lm_response(self.forward(), prompt, messages, **kwargs)

        def forward(self) -> Any:
            return _provider_response()

        def _process_lm_response(self, response: Any, prompt: Any, messages: Any, **kwargs: Any) -> list[str]:
            return ["ok"]

    return LegacyBaseLM


def _typed_base() -> type:
    """A BaseLM shaped like DSPy 3.3's typed path: only _finalize_lm_response sees the LMResponse."""

    class LMResponse:
        def __init__(self) -> None:
            self.cost, self.cache_hit, self.model = 0.5, True, "typed-model"

        def usage_as_dict(self) -> dict[str, int]:
            return {"prompt_tokens": 3, "completion_tokens": 2}

    class TypedBaseLM:
        def __call__(self) -> Any:
            return self._finalize_lm_response("request", LMResponse())

        def _finalize_lm_response(self, request: Any, response: Any) -> Any:
            return response

        def _process_lm_response(self, response: Any, prompt: Any, messages: Any, **kwargs: Any) -> list[str]:
            return ["never called on this path"]

    return TypedBaseLM


@pytest.fixture
def no_execution_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DSPy before 3.4: ``import dspy.clients.execution`` fails."""
    monkeypatch.setitem(sys.modules, "dspy.clients.execution", None)


def _captures(base: type) -> tuple[list[Any], Patcher, dspy_compat.LMHooks]:
    seen: list[Any] = []
    patcher = Patcher()
    hooks = dspy_compat.install_lm_result_hooks(patcher, base, lambda lm, captured: seen.append((lm, captured)))
    return seen, patcher, hooks


@pytest.mark.usefixtures("no_execution_module")
def test_the_legacy_hook_reads_the_provider_response() -> None:
    base = _legacy_base()
    seen, patcher, hooks = _captures(base)
    assert hooks.names == ("BaseLM._process_lm_response",)

    class Subclass(base):  # defined after instrumenting: the subclass hook wraps its own override
        def _process_lm_response(self, response: Any, *args: Any, **kwargs: Any) -> list[str]:
            return super()._process_lm_response(response, *args, **kwargs)

    lm = Subclass()
    assert lm(prompt="p") == ["ok"]
    result = dspy_compat.resolve(seen[0][1])
    assert seen[0][0] is lm and len(seen) == 2  # the subclass's override and BaseLM's both see it
    assert result == dspy_compat.LMResult(
        {"prompt_tokens": 11, "completion_tokens": 4}, 0.00012, False, "gpt-4o-mini-2024"
    )
    patcher.restore_all()
    seen.clear()
    assert base()(prompt="p") == ["ok"] and seen == []


@pytest.mark.usefixtures("no_execution_module")
def test_a_hit_from_a_cache_that_does_not_mark_it_is_still_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    class Cache300:
        """DSPy 3.0.0-3.0.3's cache: a hit is a deep copy with ``usage`` emptied, and no ``cache_hit``."""

        def __init__(self) -> None:
            self.entries: dict[str, Any] = {}

        def get(self, request: str) -> Any:
            if request not in self.entries:
                return None
            response = copy.deepcopy(self.entries[request])
            response.usage = {}
            return response

        def put(self, request: str, value: Any) -> None:
            self.entries[request] = value

    monkeypatch.setattr(importlib.import_module("dspy.clients.cache"), "Cache", Cache300)
    cache = Cache300()

    class CachedLM:
        def __call__(self, request: str) -> Any:
            response = cache.get(request)
            if response is None:
                response = _provider_response()
                cache.put(request, response)
            return self._process_lm_response(response, None, None)

        def _process_lm_response(self, response: Any, prompt: Any, messages: Any, **kwargs: Any) -> list[str]:
            return ["ok"]

    seen, patcher, _ = _captures(CachedLM)
    lm = CachedLM()
    for request in ("q1", "q1", "q2", "q2"):
        assert lm(request) == ["ok"]
    results = [dspy_compat.resolve(captured) for _, captured in seen]
    assert [r.cache_hit for r in results] == [False, True, False, True]
    assert results[1].usage == {} and results[0].usage == {"prompt_tokens": 11, "completion_tokens": 4}
    patcher.restore_all()
    assert not hasattr(Cache300.get, "_roma_otel_original")


@pytest.mark.usefixtures("no_execution_module")
def test_the_typed_hook_reads_the_lm_response() -> None:
    base = _typed_base()
    seen, patcher, hooks = _captures(base)
    assert hooks.names == ("BaseLM._finalize_lm_response", "BaseLM._process_lm_response")
    base()()
    assert dspy_compat.resolve(seen[0][1]) == dspy_compat.LMResult(
        {"prompt_tokens": 3, "completion_tokens": 2}, 0.5, True, "typed-model"
    )
    patcher.restore_all()


def test_the_execution_finalize_hook_is_used_alone_where_dspy_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("dspy.clients.execution")
    call_result = types.SimpleNamespace(usage={"prompt_tokens": 1}, cost=None, cache_hit=False, response_model="m")
    module.finalize = lambda lm, call, result: "finalized"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dspy.clients.execution", module)
    base = _legacy_base()
    seen, patcher, hooks = _captures(base)
    assert hooks.names == ("execution.finalize",)
    assert module.finalize("lm", "call", call_result) == "finalized"
    assert seen == [("lm", call_result)]  # DSPy 3.4's CallResult already has LMResult's fields
    assert not hasattr(base.__dict__["_process_lm_response"], "_roma_otel_original")
    patcher.restore_all()
    assert module.finalize.__name__ == "<lambda>"


def test_the_installed_dspy_takes_the_hook_it_has() -> None:
    from dspy.clients.base_lm import BaseLM

    hooks = dspy_compat.detect_lm_hooks(BaseLM)
    try:
        import dspy.clients.execution as execution
    except ImportError:
        execution = None
    if execution is not None and hasattr(execution, "finalize"):
        assert hooks.names == ("execution.finalize",)
    else:
        assert "BaseLM._process_lm_response" in hooks.names
        assert ("BaseLM._finalize_lm_response" in hooks.names) is hasattr(BaseLM, "_finalize_lm_response")


def test_a_cache_hit_and_odd_usage_convert_without_raising() -> None:
    assert dspy_compat.result_from_provider_response(_provider_response(cache_hit=True)).cache_hit is True
    odd = types.SimpleNamespace(usage=42, model=object())  # usage that is no mapping, a model that is no str
    assert dspy_compat.result_from_provider_response(odd) == dspy_compat.LMResult({}, None, False, None)


# --- degrading on shapes roma-otel does not know -------------------------------------------------------


def test_an_lm_without_any_result_hook_still_gets_spans_and_one_warning(
    make_tel: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dspy_compat, "detect_lm_hooks", lambda base: dspy_compat.LMHooks())
    with caplog.at_level(logging.WARNING, logger="roma_otel"):
        tel = make_tel()
    dspy.configure(lm=answer_lm(answer="42"))
    dspy.Predict("question -> answer")(question="q")
    dspy.Predict("question -> answer")(question="r")
    lm_spans = tel.spans_named(LM_SPAN)
    assert len(lm_spans) == 2 and all(sc.GEN_AI_USAGE_INPUT_TOKENS not in s.attributes for s in lm_spans)
    assert all(s.attributes[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini" for s in lm_spans)
    warnings = [r.getMessage() for r in caplog.records if "does not recognise" in r.getMessage()]
    assert len(warnings) == 1 and "dspy " + dspy_compat.degraded.package_version("dspy") in warnings[0]
    assert "LM usage, cost and cache hits" in warnings[0]
    assert tel.metric_sum("roma_otel_instrumentation_errors", where="compat.dspy") == 1
    assert tel.metric_sum("lm_calls") == 2  # calls are still counted


def test_a_missing_dspy_class_degrades_only_what_needs_it(make_tel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find = dspy_compat.find

    def find(path: str, what: str) -> Any:
        if path.endswith(":Tool") or path.endswith(":ParallelExecutor"):
            return real_find("dspy:NoSuchThing" + path.rpartition(":")[2], what)
        return real_find(path, what)

    monkeypatch.setattr(dspy_compat, "find", find)
    tel = make_tel()
    dspy.configure(lm=answer_lm(answer="42"))
    dspy.Tool(lambda a: a, name="echo")(a=1)  # not traced now, and not broken
    dspy.Predict("question -> answer")(question="q")
    assert tel.spans_named(LM_SPAN) and tel.spans_named("Predict")
    assert not tel.spans_named(f"{sc.SPAN_TOOL_PREFIX} echo")
    assert {what for (_pkg, what) in degraded.degradations()} == {
        "dspy.Tool spans (toolkit methods are still traced)",
        "trace context across dspy.Parallel worker threads",
    }
    assert tel.metric_sum("roma_otel_instrumentation_errors", where="compat.dspy") == 2


@pytest.mark.parametrize("error", [ImportError, AttributeError, TypeError])
def test_instrument_never_raises_what_a_part_raises(
    make_tel: Any, monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    def broken(*args: Any) -> None:
        raise error("a DSPy shaped differently")

    monkeypatch.setattr("roma_otel.instrumentation.threads.instrument_threads", broken)
    tel = make_tel()  # does not raise
    dspy.configure(lm=answer_lm(answer="42"))
    dspy.Predict("question -> answer")(question="q")
    assert tel.spans_named(LM_SPAN) and tel.spans_named("Predict")
    assert ("dspy", "trace context across dspy.Parallel worker threads") in degraded.degradations()


# --- the OpenTelemetry SDK ----------------------------------------------------------------------------


def test_the_sdk_fast_paths_are_verified_on_the_installed_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(otel_compat.FAST_PATHS_ENV, raising=False)
    assert otel_compat.probe() == otel_compat.SdkPaths(attributes=True, scope=True, row=True)
    monkeypatch.setenv(otel_compat.FAST_PATHS_ENV, "0")
    assert otel_compat.probe() == otel_compat.PUBLIC


def test_an_sdk_span_built_differently_takes_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(otel_compat.FAST_PATHS_ENV, raising=False)
    # An SDK whose span keeps its attributes elsewhere: the probe's getters no longer find them.
    monkeypatch.setattr(otel_compat, "attribute_dict", lambda span: (_ for _ in ()).throw(AttributeError("_dict")))
    assert otel_compat.probe() == otel_compat.PUBLIC
    assert ("opentelemetry-sdk", "private fast paths (public API used)") in degraded.degradations()


def test_ended_attributes_are_the_same_on_both_paths(tel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dspy.configure(lm=answer_lm(answer="42"))
    dspy.Predict("question -> answer")(question="q")
    span = tel.spans_named(LM_SPAN)[0]
    fast = dict(otel_compat.ended_attributes(span))
    monkeypatch.setattr(otel_compat, "_PATHS", otel_compat.PUBLIC)
    public = otel_compat.ended_attributes(span)
    assert public == fast == dict(span.attributes) and public is not otel_compat.attribute_dict(span)
    assert otel_compat.public_row(span) == otel_compat.SDK_ROW(span)


def _series(registry: CollectorRegistry) -> set[str]:
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_the_prometheus_reader_serves_a_private_registry_on_either_exporter_shape(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.exporter import prometheus as exporter

    def serve(reader_class: Any) -> None:
        monkeypatch.setattr(exporter, "PrometheusMetricReader", reader_class)
        registry = CollectorRegistry(auto_describe=True)
        reader, release = otel_compat.prometheus_reader(registry)
        provider = MeterProvider(metric_readers=[reader, InMemoryMetricReader()])
        provider.get_meter("t").create_counter("compat_probe").add(1)
        assert "compat_probe_total" in _series(registry)
        assert "compat_probe_total" not in _series(REGISTRY)
        release()
        provider.shutdown()  # no error: the collector is where the reader's own shutdown expects it

    real = exporter.PrometheusMetricReader
    serve(real)

    class OldReader(real):  # 0.59b0's constructor: no registry=, always the global REGISTRY
        def __init__(self) -> None:
            super().__init__()

    serve(OldReader)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_react_sentinels_are_not_tools_on_any_version() -> None:
    from roma_otel.instrumentation.tools import _not_traced

    assert _not_traced(dspy.ReAct("question -> answer", tools=[]).tools["finish"].func)

    def submit(**kwargs: Any) -> Any:  # shaped like ReActV2's (DSPy 3.3+) submit tool
        return kwargs

    submit.__module__, submit.__qualname__ = "dspy.predict.react_v2", "ReActV2._make_submit_tool.<locals>.submit"
    assert _not_traced(submit)
    submit.__qualname__ = "my_submit"  # a user's tool of the same module name is traced
    assert not _not_traced(submit)

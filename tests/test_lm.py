"""LM calls: GenAI spans, token usage, cost, cache hits and failures, through dspy.LM's real code path."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import dspy
import litellm
import pytest
from opentelemetry.trace import SpanKind, StatusCode

import roma_otel
from roma_otel import semconv as sc
from tests.conftest import answer_lm

MOCK = "[[ ## answer ## ]]\n42\n\n[[ ## completed ## ]]"


def test_lm_span_tokens_cost_and_metrics(tel) -> None:
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=answer_lm(answer="42")), roma_otel.execution("q") as ctx:
        assert predict(question="What is 6 x 7?").answer == "42"

    span = tel.span("chat gpt-4o-mini")
    attrs = span.attributes
    assert span.kind is SpanKind.CLIENT
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[sc.GEN_AI_PROVIDER_NAME] == "openai"
    assert attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert attrs[sc.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"
    # litellm's mock reports 10 prompt and 20 completion tokens; its price map gives the cost.
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == 10
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 20
    price = litellm.model_cost["gpt-4o-mini"]
    expected = 10 * price["input_cost_per_token"] + 20 * price["output_cost_per_token"]
    assert attrs[sc.LM_COST_USD] == pytest.approx(expected, rel=1e-9)
    assert attrs[sc.LM_COST_SOURCE] == "provider"
    assert attrs[sc.LM_CACHE_HIT] is False
    assert attrs[sc.LM_LATENCY_MS] > 0
    assert attrs[sc.EXECUTION_ID] == ctx.execution_id
    assert tel.parent_of(span).name == "Predict"

    assert tel.metric_sum(sc.M_LM_TOKENS[0], module="Predict", token_type="input") == 10
    assert tel.metric_sum(sc.M_LM_TOKENS[0], module="Predict", token_type="output") == 20
    assert tel.metric_sum(sc.M_LM_COST_USD[0], module="Predict") == pytest.approx(expected)
    assert tel.metric_sum(sc.M_LM_CALLS[0], module="Predict", cache_hit="false") == 1
    assert tel.metric_sum(sc.M_LM_LATENCY_MS[0], module="Predict") == 1
    assert tel.metric_sum(sc.M_GENAI_TOKEN_USAGE[0], **{sc.GEN_AI_TOKEN_TYPE: "input"}) == 1
    assert tel.metric_sum(sc.M_GENAI_OPERATION_DURATION[0], **{sc.GEN_AI_REQUEST_MODEL: "gpt-4o-mini"}) == 1
    # ...and the execution adds it up.
    assert ctx.total_tokens == 30
    assert ctx.total_cost == pytest.approx(expected)
    assert ctx.module_stats["Predict"].calls == 1


def test_cache_hit_costs_nothing_and_spends_no_tokens(tel) -> None:
    lm = dspy.LM("openai/gpt-4o-mini", mock_response=MOCK, cache=True)
    predict = dspy.Predict("question -> answer")
    question = f"unique question {uuid.uuid4()}"  # DSPy's cache is process-wide: start from a miss
    with dspy.context(lm=lm), roma_otel.execution("cache") as ctx:
        predict(question=question)
        predict(question=question)

    first, second = sorted(tel.spans_named("chat gpt-4o-mini"), key=lambda s: s.start_time)
    assert first.attributes[sc.LM_CACHE_HIT] is False
    assert second.attributes[sc.LM_CACHE_HIT] is True
    assert second.attributes[sc.LM_COST_USD] == 0.0
    assert second.attributes[sc.LM_COST_SOURCE] == "cache"
    assert sc.GEN_AI_USAGE_INPUT_TOKENS not in second.attributes
    assert tel.metric_sum(sc.M_LM_CALLS[0], cache_hit="true") == 1
    assert tel.metric_sum(sc.M_LM_TOKENS[0], token_type="input") == 10  # only the miss spent tokens
    assert ctx.total_tokens == 30
    assert ctx.total_cost == pytest.approx(first.attributes[sc.LM_COST_USD])


def test_unpriced_model_is_unknown_not_zero(tel) -> None:
    lm = dspy.LM("openai/roma-otel-unpriced-model", mock_response=MOCK, cache=False)
    with dspy.context(lm=lm), roma_otel.execution("unknown") as ctx:
        dspy.Predict("question -> answer")(question="q")
    attrs = tel.span("chat roma-otel-unpriced-model").attributes
    assert sc.LM_COST_USD not in attrs
    assert attrs[sc.LM_COST_SOURCE] == "unknown"
    assert tel.metric_sum(sc.M_LM_COST_UNKNOWN[0], model="openai/roma-otel-unpriced-model") == 1
    assert tel.metric_sum(sc.M_LM_COST_USD[0]) == 0
    assert ctx.cost_unknown_calls == 1


def test_lm_failure_is_recorded_and_reraised_unchanged(tel) -> None:
    error = litellm.AuthenticationError("bad key", llm_provider="openai", model="gpt-4o-mini")
    lm = dspy.LM("openai/gpt-4o-mini", mock_response=error, cache=False, num_retries=0)
    with dspy.context(lm=lm), pytest.raises(Exception) as info:
        lm("hello")
    raised = info.value
    span = tel.span("chat gpt-4o-mini")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[sc.ERROR_TYPE] == type(raised).__qualname__
    assert tel.metric_sum(sc.M_GENAI_OPERATION_DURATION[0], **{sc.ERROR_TYPE: type(raised).__qualname__}) == 1
    assert tel.metric_sum(sc.M_LM_CALLS[0]) == 1


class _Failing(dspy.BaseLM):
    """An LM whose call raises the exception it was made with (DSPy wraps provider errors itself)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(model="openai/gpt-4o-mini")
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


def test_each_failed_call_keeps_its_own_error_label(tel) -> None:
    # Label sets are built once per kind of call and shared, and histogram values wait for collection
    # holding them: a later failure of the same kind must not relabel an earlier one.
    for error in (ValueError("bad"), KeyError("missing")):
        with pytest.raises(type(error)):
            _Failing(error)("hello")
    points = tel.metrics()[sc.M_GENAI_OPERATION_DURATION[0]]
    assert sorted((p.attributes.get(sc.ERROR_TYPE), p.count) for p in points) == [("KeyError", 1), ("ValueError", 1)]
    assert tel.metric_sum(sc.M_LM_CALLS[0]) == 2


def test_async_lm_call_is_a_child_of_its_module(tel) -> None:
    predict = dspy.Predict("question -> answer")

    async def run() -> str:
        with dspy.context(lm=answer_lm(answer="7")):
            return (await predict.acall(question="q")).answer

    assert asyncio.run(run()) == "7"
    lm_span = tel.span("chat gpt-4o-mini")
    assert tel.parent_of(lm_span).name == "Predict"
    assert lm_span.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 20


def test_direct_lm_call_outside_modules_is_unattributed(tel) -> None:
    lm = answer_lm(answer="x")
    assert lm("hello") == [MOCK.replace("42", "x")]
    assert tel.span("chat gpt-4o-mini").attributes[sc.MODULE] == "unattributed"
    assert tel.metric_sum(sc.M_LM_CALLS[0], module="unattributed") == 1

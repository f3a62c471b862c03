"""How roma-otel puts attributes on its spans: straight into the SDK span when that is safe, else the public path.

``Telemetry.start_span``/``set_attributes`` skip the SDK's per-value check for plain values when the
sampler cannot read attributes and the span limits cannot change them. These tests run real DSPy
programs on real SDK providers and check that what ends up on the spans is exactly what the SDK itself
would have stored, and that samplers, limits and odd values still get the SDK's behaviour.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest
from opentelemetry.attributes import _clean_attribute_value
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler
from opentelemetry.trace import SpanKind

from roma_otel import execution, telemetry
from roma_otel import semconv as sc
from roma_otel.compat.otel import paths as otel_paths
from roma_otel.config import default_config
from tests.conftest import answer_lm


class Trivial(dspy.Module):
    def forward(self, x: int) -> int:
        return x


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def explode(a: int) -> int:
    """Always fails."""
    raise ZeroDivisionError("boom")


class AttributeReadingSampler(Sampler):
    """Samples everything and remembers the attributes each span had at its start (as a rule-based sampler would)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        self.seen.setdefault(name, dict(attributes or {}))
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "AttributeReadingSampler"


def run_program() -> None:
    with dspy.context(lm=answer_lm(answer="42")):
        with execution("what is 6 x 7?", max_depth=3, solver_type="bench"):
            dspy.Predict("question -> answer")(question="What is 6 x 7?")
            dspy.Tool(add)(a=1, b=2)
            with pytest.raises(ZeroDivisionError):
                dspy.Tool(explode)(a=1)
        Trivial()(x=1)  # an outermost module call: an implicit execution


def sdk_stores(value: Any) -> Any:
    """What the installed SDK itself stores for ``value`` set on a span ("absent" when it drops it)."""
    reference = TracerProvider().get_tracer("reference").start_span("reference")
    reference.set_attributes({"key": value})
    return reference.attributes.get("key", "absent")


def by_name(spans: list) -> dict[str, dict[str, Any]]:
    return {s.name: dict(s.attributes) for s in spans}


def test_direct_path_stores_exactly_what_the_sdk_would(make_tel: Any) -> None:
    direct = make_tel()
    assert telemetry.ACTIVE is not None and telemetry.ACTIVE._attribute_blind
    run_program()
    # The default SDK provider allows the direct path, where compat.otel verified it on this SDK (not with
    # ROMA_OTEL_SDK_FAST_PATHS=0, which forces the public path: the rest of the test must hold either way).
    assert (telemetry.ACTIVE._direct_span_type is not None) is otel_paths().attributes
    direct.instrumentor.uninstrument()

    checked = make_tel(sampler=AttributeReadingSampler())
    assert not telemetry.ACTIVE._attribute_blind
    run_program()
    assert (telemetry.ACTIVE._direct_span_type is not None) is otel_paths().attributes  # end-of-span ones

    fast, slow = by_name(direct.spans()), by_name(checked.spans())
    assert set(fast) == set(slow) and len(fast) >= 6
    for name, attrs in fast.items():
        # the same keys, with values of the same types, as through the SDK's checked path
        assert {k: type(v) for k, v in attrs.items()} == {k: type(v) for k, v in slow[name].items()}, name
        for key, value in attrs.items():
            cleaned = _clean_attribute_value(value, None)
            assert cleaned == value and type(cleaned) is type(value), (name, key, value)
    tool = fast[f"{sc.SPAN_TOOL_PREFIX} add"]
    assert tool[sc.GEN_AI_TOOL_NAME] == "add" and tool[sc.TOOL_SUCCESS] is True
    execution_span = fast[sc.SPAN_EXECUTION]
    assert execution_span[sc.EXECUTION_MAX_DEPTH] == 3 and execution_span[sc.EXECUTION_STATUS] == "completed"


def test_a_sampler_that_reads_attributes_gets_them_at_the_start(make_tel: Any) -> None:
    sampler = AttributeReadingSampler()
    make_tel(sampler=sampler)
    run_program()
    lm_span = next(name for name in sampler.seen if name.startswith("chat "))
    assert sampler.seen[lm_span][sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert sampler.seen[lm_span][sc.GEN_AI_OPERATION_NAME] == "chat"
    assert sampler.seen["Trivial"][sc.MODULE] == "Trivial"
    assert sampler.seen["Trivial"][sc.EXECUTION_IMPLICIT] is True
    assert sampler.seen[f"{sc.SPAN_TOOL_PREFIX} add"][sc.GEN_AI_TOOL_NAME] == "add"
    assert sampler.seen[sc.SPAN_EXECUTION][sc.EXECUTION_TASK] == "what is 6 x 7?"


def _instrumented(limits: SpanLimits) -> tuple[InMemorySpanExporter, telemetry.Telemetry]:
    provider = TracerProvider(span_limits=limits)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, telemetry.Telemetry(default_config(), tracer_provider=provider)


def test_attribute_length_limit_is_applied_as_by_the_sdk() -> None:
    exporter, tel = _instrumented(SpanLimits(max_attribute_length=5))
    span = tel.start_span("s", SpanKind.INTERNAL, {"long": "abcdefghij", "n": 7})
    tel.set_attributes(span, {"later": "klmnopqrst"})
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert dict(finished.attributes) == {"long": "abcde", "n": 7, "later": "klmno"}
    assert tel._direct_span_type is None


def test_attribute_count_limit_drops_as_by_the_sdk() -> None:
    exporter, tel = _instrumented(SpanLimits(max_span_attributes=3))
    span = tel.start_span("s", SpanKind.INTERNAL, {"a": 1, "b": 2})
    tel.set_attributes(span, {"c": 3, "d": 4})
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert len(finished.attributes) == 3 and finished.attributes["d"] == 4
    assert finished.dropped_attributes == 1


def test_values_that_need_the_sdk_check_still_get_it() -> None:
    exporter, tel = _instrumented(SpanLimits())
    span = tel.start_span("s", SpanKind.INTERNAL, {"plain": 1})
    assert (tel._direct_span_type is not None) is otel_paths().attributes
    tel.set_attributes(span, {"listed": [1, 2], "odd": object()})  # SDK rules: a list becomes a tuple, an object None
    tel.set_attributes(span, {"after": True})
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes["listed"] == (1, 2)
    # An object: stored as None by newer SDKs, dropped by 1.38; either way exactly as the SDK itself does.
    assert finished.attributes.get("odd", "absent") == sdk_stores(object())
    assert finished.attributes["plain"] == 1 and finished.attributes["after"] is True



def test_ids_from_user_code_that_are_not_strings_still_get_the_sdk_check(make_tel: Any) -> None:
    """An execution root's attributes go in with its end figures, unchecked only when every value is
    roma-otel's own: a task id or execution id of another type is still stored as the SDK stores it."""
    import uuid

    import numpy as np

    from roma_otel import task

    class Deep(dspy.Module):
        def forward(self, x: int) -> int:
            with task("deeper", depth=np.int64(2)):  # type: ignore[arg-type]  # the depth reached comes from here
                return x

    def program() -> None:
        with task("outside any execution", task_id=["t", 7]):  # type: ignore[arg-type]
            Trivial()(x=1)  # an implicit execution whose root carries the task's id
        with execution("explicit", execution_id=uuid.UUID(int=5)):  # type: ignore[arg-type]
            Trivial()(x=2)
        Deep()(x=3)

    direct = make_tel()
    program()
    direct.instrumentor.uninstrument()
    checked = make_tel(sampler=AttributeReadingSampler())
    program()

    def typed(spans: list) -> list[dict[str, type]]:
        return [{k: type(v) for k, v in s.attributes.items()} for s in spans]

    assert typed(direct.spans()) == typed(checked.spans())
    root = next(s for s in direct.spans() if s.attributes.get(sc.EXECUTION_IMPLICIT))
    # As the installed SDK stores a mixed list: a tuple on newer SDKs, dropped (with a warning) on 1.38.
    assert root.attributes.get(sc.TASK_ID, "absent") == sdk_stores(["t", 7])
    assert root.attributes[sc.EXECUTION_STATUS] == "completed"
    for span in direct.spans():
        for key, value in span.attributes.items():
            cleaned = _clean_attribute_value(value, None)
            assert cleaned == value and type(cleaned) is type(value), (span.name, key, value)

"""roma-otel's own metric instruments: summed counters and histograms whose records wait for collection.

Each test drives ``telemetry.Telemetry`` against a real SDK MeterProvider and reads back what the SDK's
readers export, so a value lost, doubled, attributed to the wrong interval or to the wrong span fails.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from roma_otel import semconv as sc
from roma_otel.config import default_config
from roma_otel.telemetry import DeferredExecutionEnds, DeferredHistogram, Telemetry


def _points(reader: InMemoryMetricReader, name: str) -> list:
    data = reader.get_metrics_data()
    found = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def _make(readers: list[InMemoryMetricReader]) -> tuple[Telemetry, MeterProvider, TracerProvider]:
    mp = MeterProvider(metric_readers=readers)
    tp = TracerProvider()
    return Telemetry(default_config(), tracer_provider=tp, meter_provider=mp), mp, tp


TOOL = sc.M_TOOL_DURATION_MS[0]
LABELS = {sc.L_TOOLKIT_CLASS: "Calc", sc.L_TOOL_NAME: "add"}


def test_every_reader_sees_every_value_once_with_exact_sum_and_buckets() -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    tel, _, _ = _make([first, second])
    values = [0.5, 3.0, 3.0, 250.0, 90_000.0]
    for v in values:
        tel.tool_duration.record(v, LABELS)
    (p1,) = _points(first, TOOL)
    (p2,) = _points(second, TOOL)  # drained by the first collection, still delivered to this reader
    for point in (p1, p2):
        assert point.count == len(values)
        assert point.sum == pytest.approx(sum(values))
        assert point.min == 0.5 and point.max == 90_000.0
        assert dict(point.attributes) == LABELS
        assert list(point.explicit_bounds) == list(sc.TOOL_DURATION_MS_BUCKETS)
    # Cumulative readers keep the total; nothing is replayed twice on the next collection.
    (again,) = _points(first, TOOL)
    assert again.count == len(values)


def test_values_land_in_the_interval_they_were_recorded_in() -> None:
    reader = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    tel, _, _ = _make([reader])
    for v in (1.0, 2.0, 3.0):
        tel.tool_duration.record(v, LABELS)
    (p,) = _points(reader, TOOL)
    assert (p.count, p.sum) == (3, 6.0)
    tel.tool_duration.record(10.0, LABELS)
    (p,) = _points(reader, TOOL)
    assert (p.count, p.sum) == (1, 10.0)
    assert _points(reader, TOOL) == []


def test_exemplars_point_at_the_recording_span_not_the_collecting_one() -> None:
    reader = InMemoryMetricReader()
    tel, _, tp = _make([reader])
    tracer = tp.get_tracer("test")
    with tracer.start_as_current_span("tool call") as span:
        tel.tool_duration.record(5.0, LABELS)
    tel.tool_duration.record(6.0, LABELS)  # outside any span: no exemplar
    with tracer.start_as_current_span("someone collecting"):
        (p,) = _points(reader, TOOL)
    exemplars = [e for e in p.exemplars]
    assert [e.value for e in exemplars] == [5.0]
    assert exemplars[0].trace_id == span.get_span_context().trace_id
    assert exemplars[0].span_id == span.get_span_context().span_id


def test_queue_is_bounded_without_any_collection_and_drains_a_little_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DeferredHistogram, "LIMIT", 100)
    monkeypatch.setattr(DeferredHistogram, "DRAIN_STEP", 4)
    reader = InMemoryMetricReader()
    tel, _, _ = _make([reader])
    histogram = tel.tool_duration
    for i in range(500):
        histogram.record(float(i), LABELS)
        if i >= 100:  # bounded, and never emptied in one go by the call that crossed the limit
            assert 97 <= len(histogram._pending) <= 100
    (p,) = _points(reader, TOOL)
    assert p.count == 500 and p.sum == sum(range(500))


def test_concurrent_records_and_collections_lose_and_double_nothing() -> None:
    reader = InMemoryMetricReader()
    tel, _, _ = _make([reader])
    per_thread, threads = 3000, 4
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            reader.get_metrics_data()

    def work() -> None:
        for _ in range(per_thread):
            tel.tool_duration.record(1.0, LABELS)

    collector = threading.Thread(target=collect)
    collector.start()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    collector.join()
    (p,) = _points(reader, TOOL)
    assert p.count == per_thread * threads
    assert p.sum == per_thread * threads


def test_instrumenting_again_on_the_same_meter_shares_queues_and_totals() -> None:
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    first = Telemetry(default_config(), meter_provider=mp)
    first.tool_duration.record(1.0, LABELS)
    first.tool_invocations.add(1, LABELS)
    second = Telemetry(default_config(), meter_provider=mp)
    assert second.tool_duration is first.tool_duration
    second.tool_duration.record(2.0, LABELS)
    second.tool_invocations.add(1, LABELS)
    (p,) = _points(reader, TOOL)
    assert (p.count, p.sum) == (2, 3.0)
    (c,) = _points(reader, sc.M_TOOL_INVOCATIONS[0])
    assert c.value == 2


EXECUTIONS = sc.M_EXECUTIONS[0]
EXEC_DURATION = sc.M_EXECUTION_DURATION_SECONDS[0]
EXEC_COST = sc.M_EXECUTION_COST_USD[0]


def _collect(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    found: dict[str, list] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def _by_status(points: list) -> dict[str, Any]:
    return {p.attributes[sc.L_STATUS]: p for p in points}


def test_execution_ends_become_the_counter_and_both_histograms_with_their_span_as_exemplar() -> None:
    reader = InMemoryMetricReader()
    tel, _, tp = _make([reader])
    tracer = tp.get_tracer("test")
    with tracer.start_as_current_span("ok run") as ok_span:
        tel.execution_ends.record(False, 1.5, 0.25, ok_span)
    tel.execution_ends.record(False, 2.5, 0.5, ok_span)
    with tracer.start_as_current_span("failed run") as failed_span:
        tel.execution_ends.record(True, 4.0, 1.0, failed_span)
    with tracer.start_as_current_span("someone collecting"):
        collected = _collect(reader)  # one collection: exemplars are reported in the one they were made in
    counts = _by_status(collected[EXECUTIONS])
    assert {k: p.value for k, p in counts.items()} == {"completed": 2, "failed": 1}
    durations = _by_status(collected[EXEC_DURATION])
    costs = _by_status(collected[EXEC_COST])
    assert (durations["completed"].count, durations["completed"].sum) == (2, 4.0)
    assert (durations["failed"].count, durations["failed"].sum) == (1, 4.0)
    assert (costs["completed"].count, costs["completed"].sum) == (2, 0.75)
    assert (costs["failed"].count, costs["failed"].sum) == (1, 1.0)
    assert list(durations["failed"].explicit_bounds) == list(sc.EXECUTION_DURATION_SECONDS_BUCKETS)
    (exemplar,) = durations["failed"].exemplars
    assert exemplar.span_id == failed_span.get_span_context().span_id
    assert {e.span_id for e in costs["completed"].exemplars} == {ok_span.get_span_context().span_id}
    # Nothing replayed twice: the next collection keeps the same cumulative totals.
    assert {k: p.value for k, p in _by_status(_points(reader, EXECUTIONS)).items()} == {"completed": 2, "failed": 1}


def test_execution_end_queue_is_bounded_without_any_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeferredExecutionEnds, "LIMIT", 50)
    monkeypatch.setattr(DeferredExecutionEnds, "DRAIN_STEP", 3)
    reader = InMemoryMetricReader()
    tel, _, tp = _make([reader])
    span = tp.get_tracer("test").start_span("run")
    for i in range(300):
        tel.execution_ends.record(i % 3 == 0, 1.0, 0.0, span)
        if i >= 50:
            assert 48 <= len(tel.execution_ends._pending) <= 50
    counts = _by_status(_points(reader, EXECUTIONS))
    assert {k: p.value for k, p in counts.items()} == {"completed": 200, "failed": 100}
    assert sum(p.count for p in _points(reader, EXEC_DURATION)) == 300


def test_instrumenting_again_shares_the_execution_end_queue() -> None:
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    first = Telemetry(default_config(), meter_provider=mp)
    second = Telemetry(default_config(), meter_provider=mp)
    assert second.execution_ends is first.execution_ends
    first.execution_ends.record(False, 1.0, 0.0, first.tracer.start_span("a"))
    second.execution_ends.record(False, 1.0, 0.0, second.tracer.start_span("b"))
    (c,) = _points(reader, EXECUTIONS)
    assert c.value == 2

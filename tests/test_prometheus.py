"""The Prometheus contract: roma-otel's own endpoint, scraped over real HTTP and parsed as Prometheus does.

Dashboards and alert rules are written against the exact series in ``semconv.PROMETHEUS_SERIES``; these
tests run a real DSPy program (real ``dspy.LM`` answering through litellm's ``mock_response``) and check
the scrape: series names, label sets, values equal to the calls made, bucket rendering, no
high-cardinality ids, and that the seed's PromQL ratios can be computed from it.
"""

from __future__ import annotations

import math
import re
import socket
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import roma_otel
from roma_otel import RomaInstrumentor, telemetry
from roma_otel import semconv as sc
from roma_otel.config import default_config
from roma_otel.instrumentation.patching import ORIGINAL_ATTR
from tests.conftest import answer_lm, roma_samples

TOOLKIT = "PromCalcToolkit"
EXPLICIT_EXECUTION_ID = "exec-prom-contract-0001"
RUNS = 2  # one implicit execution (outermost module call), one explicit roma_otel.execution
PLANNER_LM_CALLS_PER_RUN = 1
EXECUTOR_LM_CALLS_PER_RUN = 2
CACHE_HITS, CACHE_MISSES, CREATES = 3, 1, 1


@roma_otel.toolkit
class PromCalcToolkit:
    """A toolkit marked with the public decorator; every public method is a tool."""

    def add(self, a: float, b: float) -> float:
        return a + b

    def divide(self, a: float, b: float) -> float:
        return a / b


class Planner(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("goal -> plan")

    def forward(self, goal: str) -> dspy.Prediction:
        return self.plan(goal=goal)


class Executor(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("plan -> draft")
        self.finish = dspy.Predict("draft -> answer")

    def forward(self, plan: str) -> dspy.Prediction:
        tools = PromCalcToolkit()
        tools.add(1, 2)
        tools.add(2, 3)
        tools.divide(4, 2)
        try:
            tools.divide(1, 0)
        except ZeroDivisionError:
            pass  # the program handles its tool failure; the metrics must still count it
        draft = self.draft(plan=plan).draft
        return self.finish(draft=draft)


class TripAgent(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.planner = Planner()
        self.executor = Executor()

    def forward(self, goal: str) -> dspy.Prediction:
        return self.executor(plan=self.planner(goal=goal).plan)


# Per run: add x2 (ok), divide x2 (1 ok, 1 ZeroDivisionError).
TOOL_CALLS = {"add": 2 * RUNS, "divide": 2 * RUNS}
TOOL_SUCCESS = {"add": 2 * RUNS, "divide": 1 * RUNS}
TOOL_FAILED = {"divide": 1 * RUNS}


# --- helpers ---------------------------------------------------------------------------------------
def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode("utf-8")


def parse(text: str) -> tuple[dict[str, Any], list[Any]]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for f in families.values() for s in f.samples]
    return families, samples


def own_labels(labels: dict[str, str]) -> dict[str, str]:
    """The sample's labels without the exporter's otel_scope_* labels."""
    return {k: v for k, v in labels.items() if not k.startswith("otel_scope_")}


def select(samples: list[Any], name: str, **labels: str) -> list[Any]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in select(samples, name, **labels))


def sum_by(samples: list[Any], name: str, label: str) -> dict[str, float]:
    """PromQL ``sum by (label) (name)``."""
    out: dict[str, float] = defaultdict(float)
    for s in samples:
        if s.name == name:
            out[s.labels[label]] += s.value
    return dict(out)


def prometheus_config(port: int = 0) -> Any:
    cfg = default_config()
    cfg.observability.prometheus.enabled = True
    cfg.observability.prometheus.port = port
    return cfg


@pytest.fixture
def endpoint() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """roma-otel serving its own endpoint on a free port (no meter_provider passed)."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, config=prometheus_config())
    try:
        assert instrumentor.prometheus_endpoint is not None
        yield instrumentor.prometheus_endpoint, exporter
    finally:
        instrumentor.uninstrument()


def run_program() -> list[str]:
    """RUNS runs of TripAgent, tasks, and toolkit lifecycle events; returns the answers."""
    agent = TripAgent()
    answers = []
    with dspy.context(lm=answer_lm(plan="see the sights", draft="a draft", answer="a fine weekend")):
        answers.append(agent(goal="plan a weekend in Barcelona").answer)  # implicit execution
        with roma_otel.execution("weekend trip", execution_id=EXPLICIT_EXECUTION_ID):
            with roma_otel.task("plan and execute"):
                answers.append(agent(goal="plan a weekend in Rome").answer)
            with roma_otel.task("warm the toolkit cache"):
                for _ in range(CACHE_MISSES):
                    roma_otel.record_toolkit_event("cache_miss", TOOLKIT, duration_ms=0.2)
                for _ in range(CREATES):
                    roma_otel.record_toolkit_event("create", TOOLKIT, duration_ms=3.0)
                for _ in range(CACHE_HITS):
                    roma_otel.record_toolkit_event("cache_hit", TOOLKIT, duration_ms=0.1)
            with pytest.raises(RuntimeError), roma_otel.task("doomed step"):
                raise RuntimeError("step failed")
    return answers


# --- the contract ----------------------------------------------------------------------------------
def test_scrape_has_the_contract_series_with_exact_names_labels_and_values(endpoint: Any) -> None:
    ep, exporter = endpoint
    answers = run_program()
    assert answers == ["a fine weekend"] * RUNS

    families, samples = parse(scrape(ep.url))
    names = {s.name for s in samples}

    # Every contract series, with exactly that sample name (no unit suffix, no missing _total).
    missing = [n for n in sc.PROMETHEUS_SERIES if n not in names]
    assert not missing, f"contract series missing from the scrape: {missing}\nhave: {sorted(names)}"

    # Nothing of roma-otel's is exposed under a near-miss name (e.g. tool_duration_ms_milliseconds_bucket).
    contract_bases = {re.sub(r"_(bucket|total)$", "", n) for n in sc.PROMETHEUS_SERIES}
    allowed = set(sc.PROMETHEUS_SERIES)
    for base in contract_bases:
        allowed |= {f"{base}_sum", f"{base}_count"}
    allowed |= {
        f"{sc.M_LM_COST_UNKNOWN[0]}_total",
        f"{sc.M_INSTRUMENTATION_ERRORS[0]}_total",
        "gen_ai_client_token_usage_sum",
        "gen_ai_client_token_usage_count",
        "gen_ai_client_operation_duration_seconds_sum",
        "gen_ai_client_operation_duration_seconds_count",
    }
    ours = {s.name for s in roma_samples(samples)}
    assert ours, "no roma-otel sample"
    assert ours <= allowed, f"unexpected roma-otel series: {sorted(ours - allowed)}"

    # Prometheus types as the dashboards expect.
    assert families["tool_invocations"].type == "counter"
    assert families["tool_duration_ms"].type == "histogram"
    assert families["lm_calls"].type == "counter"
    assert families["gen_ai_client_operation_duration_seconds"].type == "histogram"

    # --- label sets -------------------------------------------------------------------------------
    expected_labels = {
        "tool_invocations_total": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME},
        "tool_invocations_success_total": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME},
        "tool_invocations_failed_total": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME, sc.L_ERROR_TYPE},
        "tool_duration_ms_bucket": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME, "le"},
        "tool_duration_ms_sum": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME},
        "tool_duration_ms_count": {sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME},
        "lm_calls_total": {sc.L_MODULE, sc.L_MODEL, sc.L_CACHE_HIT},
        "lm_tokens_total": {sc.L_MODULE, sc.L_MODEL, sc.L_TOKEN_TYPE},
        "lm_cost_usd_total": {sc.L_MODULE, sc.L_MODEL},
        "lm_latency_ms_bucket": {sc.L_MODULE, sc.L_MODEL, "le"},
        "executions_total": {sc.L_STATUS},
        "tasks_total": {sc.L_STATUS},
        "toolkit_lifecycle_events_total": {sc.L_OPERATION, sc.L_TOOLKIT_CLASS, sc.L_SUCCESS},
        "toolkit_lifecycle_duration_ms_bucket": {sc.L_OPERATION, sc.L_TOOLKIT_CLASS, sc.L_SUCCESS, "le"},
    }
    for name, keys in expected_labels.items():
        found = select(samples, name)
        assert found, name
        for s in found:
            assert set(own_labels(s.labels)) == keys, f"{name}: labels {sorted(s.labels)}"

    # --- values equal to the calls made --------------------------------------------------------------
    for tool, n in TOOL_CALLS.items():
        labels = {sc.L_TOOLKIT_CLASS: TOOLKIT, sc.L_TOOL_NAME: tool}
        assert total(samples, "tool_invocations_total", **labels) == n, tool
        assert total(samples, "tool_invocations_success_total", **labels) == TOOL_SUCCESS[tool], tool
        assert total(samples, "tool_duration_ms_count", **labels) == n, tool
        assert total(samples, "tool_duration_ms_bucket", le="+Inf", **labels) == n, tool
        assert total(samples, "tool_duration_ms_sum", **labels) >= 0.0
    failed = select(samples, "tool_invocations_failed_total")
    assert [(s.labels[sc.L_TOOL_NAME], s.labels[sc.L_ERROR_TYPE], s.value) for s in failed] == [
        ("divide", "ZeroDivisionError", float(TOOL_FAILED["divide"]))
    ]
    assert all(s.labels[sc.L_TOOLKIT_CLASS] == TOOLKIT for s in failed)

    assert sum_by(samples, "lm_calls_total", sc.L_MODULE) == {
        "planner": PLANNER_LM_CALLS_PER_RUN * RUNS,
        "executor": EXECUTOR_LM_CALLS_PER_RUN * RUNS,
    }
    assert {s.labels[sc.L_MODEL] for s in select(samples, "lm_calls_total")} == {"openai/gpt-4o-mini"}
    assert {s.labels[sc.L_CACHE_HIT] for s in select(samples, "lm_calls_total")} == {"false"}
    assert total(samples, "lm_latency_ms_count", module="planner") == PLANNER_LM_CALLS_PER_RUN * RUNS
    assert total(samples, "lm_latency_ms_count", module="executor") == EXECUTOR_LM_CALLS_PER_RUN * RUNS
    lm_calls = (PLANNER_LM_CALLS_PER_RUN + EXECUTOR_LM_CALLS_PER_RUN) * RUNS
    assert total(samples, "gen_ai_client_operation_duration_seconds_count") == lm_calls
    for token_type in (sc.TOKEN_TYPE_INPUT, sc.TOKEN_TYPE_OUTPUT):
        assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type=token_type) == lm_calls, token_type

    # Token and cost counters agree with what the LM spans recorded, per module.
    spans = list(exporter.get_finished_spans())
    lm_spans = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert len(lm_spans) == lm_calls
    for module in ("planner", "executor"):
        mine = [s for s in lm_spans if s.attributes[sc.MODULE] == module]
        for token_type, attr in (
            (sc.TOKEN_TYPE_INPUT, sc.GEN_AI_USAGE_INPUT_TOKENS),
            (sc.TOKEN_TYPE_OUTPUT, sc.GEN_AI_USAGE_OUTPUT_TOKENS),
        ):
            expected = sum(s.attributes[attr] for s in mine)
            assert expected > 0
            got = total(samples, "lm_tokens_total", module=module, token_type=token_type)
            assert got == expected, (module, token_type)
        cost = sum(s.attributes.get(sc.LM_COST_USD, 0.0) for s in mine)
        assert cost > 0
        assert total(samples, "lm_cost_usd_total", module=module) == pytest.approx(cost)

    assert total(samples, "executions_total", status="completed") == RUNS
    assert total(samples, "executions_total", status="failed") == 0
    assert total(samples, "execution_duration_seconds_count") == RUNS
    assert total(samples, "execution_cost_usd_count") == RUNS
    assert total(samples, "tasks_total", status="completed") == 2
    assert total(samples, "tasks_total", status="failed") == 1

    events = {
        op: total(samples, "toolkit_lifecycle_events_total", operation=op, toolkit_class=TOOLKIT)
        for op in sc.TOOLKIT_OPERATIONS
    }
    assert events == {"create": CREATES, "cache_hit": CACHE_HITS, "cache_miss": CACHE_MISSES, "cleanup": 0}
    assert total(samples, "toolkit_lifecycle_duration_ms_count") == CREATES + CACHE_HITS + CACHE_MISSES

    # --- the seed's PromQL ----------------------------------------------------------------------------
    # sum by (toolkit_class) (tool_invocations_success_total) / sum by (toolkit_class) (tool_invocations_total)
    success = sum_by(samples, "tool_invocations_success_total", sc.L_TOOLKIT_CLASS)
    calls = sum_by(samples, "tool_invocations_total", sc.L_TOOLKIT_CLASS)
    assert set(success) == set(calls) == {TOOLKIT}
    ratio = {k: success[k] / calls[k] for k in calls}
    assert ratio[TOOLKIT] == pytest.approx(sum(TOOL_SUCCESS.values()) / sum(TOOL_CALLS.values()))
    # cache hit rate: hits / (hits + misses) from toolkit_lifecycle_events_total{operation=...}
    hits = total(samples, "toolkit_lifecycle_events_total", operation="cache_hit")
    misses = total(samples, "toolkit_lifecycle_events_total", operation="cache_miss")
    assert hits / (hits + misses) == pytest.approx(CACHE_HITS / (CACHE_HITS + CACHE_MISSES))


def test_bucket_labels_are_rendered_floats_and_cover_tool_durations(endpoint: Any) -> None:
    ep, _ = endpoint
    run_program()
    _, samples = parse(scrape(ep.url))

    buckets = [s for s in samples if s.name.endswith("_bucket")]
    assert buckets
    for s in buckets:
        le = s.labels["le"]
        # Floats rendered as floats ("5.0", never "5"), plus "+Inf".
        assert le == "+Inf" or re.fullmatch(r"\d+\.\d+(e[+-]\d+)?|\d\.\d+e[+-]\d+", le), (s.name, le)

    series = select(samples, "tool_duration_ms_bucket", toolkit_class=TOOLKIT, tool_name="add")
    les = [s.labels["le"] for s in series]
    assert les == [repr(b) for b in sc.TOOL_DURATION_MS_BUCKETS] + ["+Inf"]
    assert les[0] == "1.0"
    assert "5.0" in les
    finite = [float(le) for le in les if le != "+Inf"]
    assert finite[0] == 1.0
    assert max(finite) >= 300000.0
    assert "300000.0" in les
    # Cumulative and ending at the count.
    values = [s.value for s in series]
    assert values == sorted(values)
    assert values[-1] == total(samples, "tool_duration_ms_count", toolkit_class=TOOLKIT, tool_name="add")


def test_no_label_carries_an_execution_or_trace_id(endpoint: Any) -> None:
    ep, exporter = endpoint
    run_program()
    _, samples = parse(scrape(ep.url))

    spans = list(exporter.get_finished_spans())
    ids: set[str] = {EXPLICIT_EXECUTION_ID}
    for span in spans:
        for key in (sc.EXECUTION_ID, sc.TASK_ID):
            value = span.attributes.get(key)
            if value is not None:
                ids.add(str(value))
        ids.add(format(span.context.trace_id, "032x"))
        ids.add(format(span.context.span_id, "016x"))
    execution_ids = {str(s.attributes[sc.EXECUTION_ID]) for s in spans if sc.EXECUTION_ID in s.attributes}
    assert len(execution_ids) == RUNS  # the implicit one and the explicit one
    assert EXPLICIT_EXECUTION_ID in execution_ids

    id_like = re.compile(r"(execution|span|trace|task|run)_?id", re.IGNORECASE)
    ours = roma_samples(samples)
    assert ours
    for s in ours:
        for key, value in s.labels.items():
            assert not id_like.search(key), f"{s.name} has an id label {key}={value!r}"
            for i in ids:
                assert i not in value, f"{s.name} label {key}={value!r} carries id {i!r}"


# --- explicit bucket boundaries (in-memory reader) ----------------------------------------------------
def test_histograms_use_the_semconv_bucket_boundaries(tel: Any) -> None:
    run_program()
    expected = {
        sc.M_TOOL_DURATION_MS[0]: sc.TOOL_DURATION_MS_BUCKETS,
        sc.M_GENAI_TOKEN_USAGE[0]: sc.GENAI_TOKEN_USAGE_BUCKETS,
        sc.M_GENAI_OPERATION_DURATION[0]: sc.GENAI_OPERATION_DURATION_BUCKETS,
        sc.M_LM_LATENCY_MS[0]: sc.LM_LATENCY_MS_BUCKETS,
        sc.M_EXECUTION_DURATION_SECONDS[0]: sc.EXECUTION_DURATION_SECONDS_BUCKETS,
        sc.M_EXECUTION_COST_USD[0]: sc.EXECUTION_COST_USD_BUCKETS,
        sc.M_TOOLKIT_LIFECYCLE_DURATION_MS[0]: sc.TOOL_DURATION_MS_BUCKETS,
    }
    metrics = tel.metrics()
    for name, bounds in expected.items():
        points = metrics.get(name)
        assert points, f"no points for {name}"
        for point in points:
            assert tuple(point.explicit_bounds) == tuple(bounds), name
            assert all(isinstance(b, float) for b in point.explicit_bounds), name
    # The three the brief singles out, exactly.
    assert tuple(metrics["tool_duration_ms"][0].explicit_bounds) == sc.TOOL_DURATION_MS_BUCKETS
    assert tuple(metrics["gen_ai.client.token.usage"][0].explicit_bounds) == sc.GENAI_TOKEN_USAGE_BUCKETS
    assert tuple(metrics["gen_ai.client.operation.duration"][0].explicit_bounds) == sc.GENAI_OPERATION_DURATION_BUCKETS
    assert sc.TOOL_DURATION_MS_BUCKETS[0] == 1.0 and sc.TOOL_DURATION_MS_BUCKETS[-1] >= 300000.0
    assert not any(math.isinf(b) for b in sc.TOOL_DURATION_MS_BUCKETS)


# --- endpoint lifecycle ----------------------------------------------------------------------------------
def test_endpoint_stops_on_uninstrument() -> None:
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(config=prometheus_config())
    ep = instrumentor.prometheus_endpoint
    assert ep is not None and ep.port > 0
    assert ep.url == f"http://127.0.0.1:{ep.port}/metrics"
    scrape(ep.url)  # serving

    instrumentor.uninstrument()
    assert instrumentor.prometheus_endpoint is None
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen(ep.url, timeout=5)
    assert isinstance(info.value.reason, ConnectionRefusedError), info.value

    # A second instrument() starts a fresh endpoint.
    instrumentor.instrument(config=prometheus_config())
    try:
        again = instrumentor.prometheus_endpoint
        assert again is not None
        scrape(again.url)
    finally:
        instrumentor.uninstrument()


def test_busy_port_fails_naming_the_config_key() -> None:
    import dspy as _dspy

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        instrumentor = RomaInstrumentor()
        with pytest.raises(OSError, match=r"observability\.prometheus") as info:
            instrumentor.instrument(config=prometheus_config(port))
        assert str(port) in str(info.value)

    # Nothing half-done: no telemetry, no patches, no endpoint; instrument() works afterwards.
    assert telemetry.ACTIVE is None
    assert instrumentor.prometheus_endpoint is None
    for owner, name in ((_dspy.Predict, "forward"), (_dspy.Tool, "__call__")):
        assert not hasattr(owner.__dict__[name], ORIGINAL_ATTR), (owner, name)
    instrumentor.instrument(config=prometheus_config())
    try:
        assert instrumentor.prometheus_endpoint is not None
    finally:
        instrumentor.uninstrument()

"""The latest GenAI conventions as an opt-in, and where captured content goes.

With ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` ROMA roles and executions are
``invoke_agent`` spans, the system prompt is ``gen_ai.system_instructions``, agent content is GenAI
messages; without it every name is today's (the contract tests check those). The content destination
comes from ``observability.content_capture`` or ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import dspy
import pytest

from roma_otel import semconv as sc
from roma_otel.config import ConfigError, default_config, load_config
from roma_otel.demo.agent import DEMO_GOAL, run_demo_agent
from roma_otel.storage import rows
from tests.conftest import answer_lm

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def _capture_config(destination: str = "span") -> Any:
    config = default_config()
    config.observability.content_capture.enabled = True
    config.observability.content_capture.destination = destination
    return config


@pytest.fixture
def latest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sc.SEMCONV_OPT_IN_ENV, "http, gen_ai_latest_experimental")


def _by_name(spans: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def test_default_names_are_unchanged(make_tel: Any) -> None:
    tel = make_tel(_capture_config())
    run_demo_agent(DEMO_GOAL, max_depth=2)
    names = _by_name(tel.spans())
    assert sc.SPAN_EXECUTION in names and not any(n.startswith(sc.OP_INVOKE_AGENT) for n in names)
    assert {"Atomizer", "Planner", "Executor", "Aggregator"} <= set(names)
    for span in tel.spans():
        assert sc.GEN_AI_AGENT_NAME not in span.attributes and sc.GEN_AI_SYSTEM_INSTRUCTIONS not in span.attributes
        assert sc.GEN_AI_TOOL_TYPE not in span.attributes
        assert span.instrumentation_scope.schema_url == "https://opentelemetry.io/schemas/1.37.0"
    lm = next(s for s in tel.spans() if s.attributes.get(sc.GEN_AI_OPERATION_NAME) == sc.OP_CHAT)
    assert json.loads(lm.attributes[sc.GEN_AI_INPUT_MESSAGES])[0]["role"] == "system"
    planner = names["Planner"][0]
    assert json.loads(planner.attributes[sc.INPUT_VALUE])  # module content: input.value, JSON


def test_opt_in_follows_the_latest_conventions(make_tel: Any, latest: None) -> None:
    tel = make_tel(_capture_config())
    run_demo_agent(DEMO_GOAL, max_depth=2)
    spans = tel.spans()
    names = _by_name(spans)
    root = names[f"{sc.OP_INVOKE_AGENT} DemoSolver"][0]
    assert root.parent is None and root.attributes[sc.GEN_AI_OPERATION_NAME] == sc.OP_INVOKE_AGENT
    assert root.attributes[sc.GEN_AI_AGENT_NAME] == "DemoSolver"
    assert json.loads(root.attributes[sc.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": json.dumps({"goal": DEMO_GOAL})}]}
    ]
    assert json.loads(root.attributes[sc.GEN_AI_OUTPUT_MESSAGES])[0]["role"] == "assistant"
    for role in sc.ROLES[:4]:
        (agent, *_) = names[f"{sc.OP_INVOKE_AGENT} {role}"]
        assert agent.attributes[sc.GEN_AI_AGENT_NAME] == role
        assert agent.attributes[sc.GEN_AI_OPERATION_NAME] == sc.OP_INVOKE_AGENT
        assert sc.GEN_AI_INPUT_MESSAGES in agent.attributes and sc.INPUT_VALUE not in agent.attributes
    lm = [s for s in spans if s.attributes.get(sc.GEN_AI_OPERATION_NAME) == sc.OP_CHAT]
    assert lm
    for span in lm:
        system = json.loads(span.attributes[sc.GEN_AI_SYSTEM_INSTRUCTIONS])
        assert system[0]["type"] == "text" and system[0]["content"]
        assert {m["role"] for m in json.loads(span.attributes[sc.GEN_AI_INPUT_MESSAGES])} == {"user"}
        assert tuple(span.attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS]) == ("stop",)
        assert json.loads(span.attributes[sc.GEN_AI_OUTPUT_MESSAGES])[0]["finish_reason"] == "stop"
    tools = [s for s in spans if s.attributes.get(sc.GEN_AI_OPERATION_NAME) == sc.OP_EXECUTE_TOOL]
    assert tools and all(s.attributes[sc.GEN_AI_TOOL_TYPE] == "function" for s in tools)
    assert all(s.instrumentation_scope.schema_url == sc.GENAI_SEMCONV_SCHEMA_URL for s in spans)
    # The metrics keep their names and carry the conventions' required attributes.
    points = tel.metrics()[sc.M_GENAI_TOKEN_USAGE[0]]
    assert points and all(p.attributes[sc.GEN_AI_PROVIDER_NAME] == "openai" for p in points)
    # The Postgres writer still finds the execution, its LM calls and tools.
    kinds = {rows.classify(s) for s in spans}
    assert rows.classify(root) == rows.ROOT and {rows.LM, rows.TOOL, rows.NODE} <= kinds


def test_mlflow_sees_the_system_prompt_and_agent_types_under_the_opt_in(make_tel: Any, latest: None) -> None:
    from roma_otel.mlflow.traces import MLflowSpanForwarder, TraceJob, prepare_spans

    jobs: list[TraceJob] = []
    tel = make_tel(_capture_config())
    forwarder = MLflowSpanForwarder(jobs.append, capture=True)
    tel.tracer_provider.add_span_processor(forwarder)
    tel.instrumentor.telemetry.roots_in_context = True
    run_demo_agent(DEMO_GOAL, max_depth=2)
    (job,) = jobs
    prepared = prepare_spans(job)
    types = {s.name: s.attributes.get(sc.MLFLOW_SPAN_TYPE) for s in prepared}
    assert types[f"{sc.OP_INVOKE_AGENT} DemoSolver"] == types[f"{sc.OP_INVOKE_AGENT} planner"] == "AGENT"
    lm = next(s for s in prepared if s.attributes.get(sc.GEN_AI_OPERATION_NAME) == sc.OP_CHAT)
    assert json.loads(lm.attributes[sc.GEN_AI_INPUT_MESSAGES])[0]["role"] == "system"


# --- where content goes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "enabled", "destination"),
    [("SPAN_ONLY", True, "span"), ("event_only", True, "event"), ("Span_And_Event", True, "span_and_event"),
     ("NO_CONTENT", False, "span"), ("true", True, "span"), ("0", False, "span")],
)  # fmt: skip
def test_capture_env_takes_the_genai_modes_and_booleans(raw: str, enabled: bool, destination: str) -> None:
    cc = load_config(env={CAPTURE_ENV: raw}).observability.content_capture
    assert (cc.enabled, cc.destination) == (enabled, destination)


def test_capture_env_overrides_the_file_and_bad_values_name_the_variable(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("observability:\n  content_capture:\n    enabled: false\n    destination: span\n")
    cc = load_config(path, env={CAPTURE_ENV: "EVENT_ONLY"}).observability.content_capture
    assert cc.enabled and cc.destination == "event"  # the environment wins, as for every variable
    with pytest.raises(ConfigError, match=f"{CAPTURE_ENV}: must be one of NO_CONTENT, SPAN_ONLY"):
        load_config(env={CAPTURE_ENV: "SPANS"})
    path.write_text("observability:\n  content_capture:\n    destination: logs\n")
    with pytest.raises(ConfigError, match=r"observability\.content_capture\.destination"):
        load_config(path, env={})


@pytest.fixture
def log_records() -> Iterator[tuple[Any, Any]]:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs import export as log_export

    exporter_cls = getattr(log_export, "InMemoryLogRecordExporter", None) or log_export.InMemoryLogExporter
    exporter = exporter_cls()
    provider = LoggerProvider()
    provider.add_log_record_processor(log_export.SimpleLogRecordProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _instrument_with_logs(destination: str, logger_provider: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from roma_otel import RomaInstrumentor

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    RomaInstrumentor().instrument(
        tracer_provider=tracer_provider, logger_provider=logger_provider, config=_capture_config(destination)
    )
    return spans


@pytest.mark.parametrize("destination", ["event", "span_and_event"])
def test_lm_content_as_the_genai_inference_event(destination: str, log_records: tuple[Any, Any]) -> None:
    provider, exporter = log_records
    spans = _instrument_with_logs(destination, provider)
    secret = "sk-abcdefghijklmnopqrstuvwxyz123456"
    with dspy.context(lm=answer_lm(answer="Paris")):
        dspy.Predict("question -> answer")(question=f"Capital of France? key {secret}")
    (lm,) = [s for s in spans.get_finished_spans() if s.attributes.get(sc.GEN_AI_OPERATION_NAME) == sc.OP_CHAT]
    records = [getattr(r, "log_record", r) for r in exporter.get_finished_logs()]
    (event,) = [r for r in records if r.event_name == "gen_ai.client.inference.operation.details"]
    assert event.context is not None or event.trace_id == lm.context.trace_id
    attrs = dict(event.attributes)
    assert attrs[sc.GEN_AI_OPERATION_NAME] == sc.OP_CHAT and attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == lm.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS]
    system = attrs[sc.GEN_AI_SYSTEM_INSTRUCTIONS]
    assert system[0]["type"] == "text"  # structured values, not JSON text
    (user,) = attrs[sc.GEN_AI_INPUT_MESSAGES]
    assert user["role"] == "user" and "Capital of France" in user["parts"][0]["content"]
    assert secret not in json.dumps(attrs)
    assert "Paris" in attrs[sc.GEN_AI_OUTPUT_MESSAGES][0]["parts"][0]["content"]
    on_span = sc.GEN_AI_INPUT_MESSAGES in lm.attributes
    assert on_span is (destination == "span_and_event")

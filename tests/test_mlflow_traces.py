"""How roma-otel's traces read in MLflow, asserted through MLflow's own trace API against a real ``mlflow server``.

One program run per content-capture setting (on, off): the offline demo agent (a ROMA-style solver with
tools and toolkits), an outermost module call (an implicit execution), an explicit execution with session,
user and tags in its metadata, and an LM call on a model no price table knows. Each test then reads what
MLflow stored: span types and the TOOL filter, trace names, request/response previews, that every stored
input and output parses, cost and tokens as roma-otel computed them, the link to each execution's run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dspy
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

import roma_otel  # noqa: E402
from roma_otel import semconv as sc  # noqa: E402
from roma_otel.compat import mlflow as mlflow_compat  # noqa: E402
from roma_otel.config import RomaOtelConfig, default_config  # noqa: E402
from roma_otel.context import ExecutionContext  # noqa: E402
from roma_otel.demo.agent import DEMO_GOAL, run_demo_agent  # noqa: E402
from tests.conftest import answer_lm, make_telemetry  # noqa: E402
from tests.mlflowserver import Server  # noqa: E402
from tests.test_mlflow import Ask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

UNPRICED = "openai/roma-otel-unpriced-model"
EXPECTED_TYPES = {"AGENT", "CHAIN", "CHAT_MODEL", "TOOL", "TASK"}


@dataclass
class Stored:
    """One program run and what the server holds for it."""

    capture: bool
    experiment_id: str
    executions: dict[str, ExecutionContext]  # demo, implicit, explicit, unpriced
    runs: dict[str, Any]  # execution id -> run
    traces: dict[str, Any]  # execution id -> trace (from get_trace)
    spans: list[Any]  # roma-otel's SDK spans, as the program made them
    bridge: Any


def _config(uri: str, experiment: str, capture: bool) -> RomaOtelConfig:
    config = default_config()
    ml = config.observability.mlflow
    ml.enabled, ml.tracking_uri, ml.experiment_name = True, uri, experiment
    config.observability.content_capture.enabled = capture
    config.observability.content_capture.max_length = 600  # small: the demo's prompts must be cut
    return config


def run_program(uri: str, experiment: str, capture: bool) -> Stored:
    tel = make_telemetry(_config(uri, experiment, capture))
    try:
        bridge = tel.instrumentor.mlflow_bridge
        finished: list[ExecutionContext] = []
        tel.instrumentor.telemetry.execution_listeners.append(finished.append)
        run_demo_agent(DEMO_GOAL, max_depth=2)
        with dspy.context(lm=answer_lm(answer="Paris")):
            Ask()(question="Capital of France?")
            metadata = {"session_id": "sess-42", "user_id": "ada", "tags": {"team": "travel"}}
            with roma_otel.execution("Two capitals", metadata=metadata, solver_type="Pair") as ctx:
                Ask()(question="Capital of Italy?")
                ctx.output = "Rome"
        with dspy.context(lm=answer_lm(model=UNPRICED, answer="?")):
            Ask()(question="Who prices this?")
        assert bridge.flush(60)
        assert bridge.dropped_traces == 0 and bridge.traces_written == 4
        spans = tel.spans()
    finally:
        tel.instrumentor.uninstrument()
        tel.meter_provider.shutdown()
    demo, implicit, explicit, unpriced = finished
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {r.data.tags["execution_id"]: r for r in client.search_runs([experiment_id], max_results=100)}
    traces = {}
    for info in client.search_traces(locations=[experiment_id], max_results=100):
        full = client.get_trace(info.info.trace_id)
        traces[full.info.tags["execution_id"]] = full
    executions = {"demo": demo, "implicit": implicit, "explicit": explicit, "unpriced": unpriced}
    return Stored(capture, experiment_id, executions, runs, traces, spans, bridge)


@pytest.fixture(scope="module", params=[True, False], ids=["capture-on", "capture-off"])
def stored(request: pytest.FixtureRequest, mlflow_server: Server) -> Stored:
    capture = bool(request.param)
    return run_program(mlflow_server.url, f"traces-capture-{'on' if capture else 'off'}", capture)


def _spans_of(s: Stored, ctx: ExecutionContext) -> list[Any]:
    return list(s.traces[ctx.execution_id].data.spans)


def _attr(span: Any, key: str) -> Any:
    return span.get_attribute(key)


def _lm_spans(s: Stored, ctx: ExecutionContext) -> list[Any]:
    return [x for x in _spans_of(s, ctx) if _attr(x, sc.GEN_AI_OPERATION_NAME) == sc.OP_CHAT]


# --- 1. span types, names, previews --------------------------------------------------------------------
def test_every_span_has_its_mlflow_type_and_the_tool_filter_works(stored: Stored) -> None:
    demo = stored.executions["demo"]
    spans = _spans_of(stored, demo)
    by_type: dict[str, set[str]] = {}
    for span in spans:
        by_type.setdefault(span.span_type, set()).add(span.name)
    assert set(by_type) == EXPECTED_TYPES, by_type  # no UNKNOWN, no unset type
    root = next(x for x in spans if x.parent_id is None)
    assert root.span_type == "AGENT"
    assert {x.name.split()[0] for x in spans if x.span_type == "TOOL"} == {sc.SPAN_TOOL_PREFIX}
    assert all(x.name.startswith(sc.SPAN_TOOLKIT_PREFIX) for x in spans if x.span_type == "TASK")
    roles = {_attr(x, sc.MODULE) for x in spans if x.span_type == "AGENT" and x is not root}
    assert roles == {"atomizer", "planner", "executor", "aggregator"}
    assert all(_attr(x, sc.MODULE) not in sc.ROLES for x in spans if x.span_type == "CHAIN"
               if _attr(x, sc.MODULE_CLASS) is not None)  # fmt: skip
    # MLflow's span-type filter finds exactly the traces that called tools
    found = MlflowClient(stored.bridge.tracking_uri).search_traces(
        locations=[stored.experiment_id], filter_string="span.type = 'TOOL'", max_results=100
    )
    assert {t.info.tags["execution_id"] for t in found} == {demo.execution_id}


def test_traces_are_named_after_their_goal_or_module(stored: Stored) -> None:
    names = {key: stored.traces[ctx.execution_id].info.tags["mlflow.traceName"]
             for key, ctx in stored.executions.items()}  # fmt: skip
    assert sc.SPAN_EXECUTION not in names.values()
    assert names["implicit"] == names["unpriced"] == "Ask"  # the outermost module's class
    if stored.capture:
        assert names["demo"] == DEMO_GOAL and names["explicit"] == "Two capitals"
    else:  # the goal is content: the solver names the trace instead
        assert names["demo"] == "DemoSolver" and names["explicit"] == "Pair"


def test_the_trace_list_has_a_request_and_a_response_for_every_trace(stored: Stored) -> None:
    for key, ctx in stored.executions.items():
        info = stored.traces[ctx.execution_id].info
        assert info.request_preview and info.response_preview, key
    demo = stored.traces[stored.executions["demo"].execution_id].info
    explicit = stored.traces[stored.executions["explicit"].execution_id].info
    implicit = stored.traces[stored.executions["implicit"].execution_id].info
    if stored.capture:
        assert json.loads(demo.request_preview) == {"goal": DEMO_GOAL}
        answer = stored.executions["demo"].output["answer"]
        response = json.loads(demo.response_preview)  # the answer is long: cut to max_length, still JSON
        assert response["status"] == "completed" and response["answer"].startswith(answer[:200])
        assert json.loads(explicit.response_preview) == "Rome"
        assert json.loads(implicit.request_preview) == {"question": "Capital of France?"}
        assert json.loads(implicit.response_preview) == {"answer": "Paris"}
    else:  # summaries, never content
        assert json.loads(demo.request_preview) == {"goal_chars": len(DEMO_GOAL), "solver": "DemoSolver"}
        assert json.loads(demo.response_preview) == {"status": "completed", "output_fields": ["answer", "status"]}
        assert json.loads(implicit.request_preview) == {"input_fields": ["question"]}
        assert json.loads(implicit.response_preview) == {"status": "completed", "output_fields": ["answer"]}
        for ctx in stored.executions.values():
            trace = stored.traces[ctx.execution_id]
            text = json.dumps([s.to_dict() for s in trace.data.spans])
            for secret in ("Capital of France", "Barcelona on a 300", "Paris"):
                assert secret not in trace.info.request_preview + trace.info.response_preview
            assert "Capital of Italy" not in text  # no LM content either


# --- 2. chat messages, valid JSON ------------------------------------------------------------------
def test_every_stored_input_and_output_parses_and_lm_calls_are_chats(stored: Stored) -> None:
    cut = 0
    for ctx in stored.executions.values():
        for span in _spans_of(stored, ctx):
            for key in ("mlflow.spanInputs", "mlflow.spanOutputs"):
                raw = span.to_dict()["attributes"].get(key)
                if raw is None:
                    continue
                value = json.loads(raw)  # MLflow's own encoding: one JSON layer
                if isinstance(value, str) and value[:1] in "[{":
                    json.loads(value)  # a JSON text inside must parse too (no cut-off JSON)
            if span.span_type == "CHAT_MODEL" and stored.capture:
                inputs, outputs = span.inputs, span.outputs
                assert isinstance(inputs, list) and inputs[0]["role"] == "system", inputs
                assert all({"role", "parts"} <= set(m) for m in inputs + outputs)
                assert outputs[0]["role"] == "assistant" and outputs[0]["parts"][0]["type"] == "text"
                cut += any("[truncated" in p.get("content", "") for m in inputs for p in m["parts"])
            if span.span_type == "CHAT_MODEL" and not stored.capture:
                assert span.inputs is None and span.outputs is None
    if stored.capture:
        assert cut >= 5  # the demo's long prompts were cut inside their contents, and stayed JSON


# --- 3. cost, tokens, session, user -------------------------------------------------------------------
def _lm_sdk_spans(s: Stored, ctx: ExecutionContext) -> dict[str, Any]:
    return {format(x.context.span_id, "016x"): x for x in s.spans
            if x.attributes.get(sc.EXECUTION_ID) == ctx.execution_id and sc.LM_COST_SOURCE in x.attributes}  # fmt: skip


def test_mlflow_shows_roma_otels_cost_and_tokens(stored: Stored) -> None:
    with_cost = mlflow_compat.traces_have_cost()  # the server is the installed MLflow
    for key, ctx in stored.executions.items():
        trace = stored.traces[ctx.execution_id]
        ours = _lm_sdk_spans(stored, ctx)
        lm = [x for x in trace.data.spans if x.span_type == "CHAT_MODEL"]
        assert {x.span_id for x in lm} == set(ours), key
        in_tok = sum(x.attributes.get(sc.GEN_AI_USAGE_INPUT_TOKENS, 0) for x in ours.values())
        out_tok = sum(x.attributes.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, 0) for x in ours.values())
        usage = json.loads(trace.info.trace_metadata["mlflow.trace.tokenUsage"])
        assert (usage["input_tokens"], usage["output_tokens"]) == (in_tok, out_tok), key
        assert usage["total_tokens"] == in_tok + out_tok == ctx.total_tokens
        cost_meta = trace.info.trace_metadata.get("mlflow.trace.cost")
        for span in lm:
            stored_cost = span.get_attribute(sc.MLFLOW_LLM_COST)
            usd = ours[span.span_id].attributes.get(sc.LM_COST_USD)
            if not with_cost:  # MLflow 3.6 has no cost: it keeps ours as a plain attribute, prices nothing
                assert "mlflow.trace.cost" not in trace.info.trace_metadata
            elif usd is None:  # unpriced: unknown stays unknown, MLflow does not price it either
                assert stored_cost is None
            else:
                assert stored_cost["total_cost"] == pytest.approx(usd)
                assert stored_cost["input_cost"] + stored_cost["output_cost"] == pytest.approx(usd)
                assert stored_cost["input_cost"] > 0 and stored_cost["output_cost"] > 0
        if with_cost and key != "unpriced":
            assert json.loads(cost_meta)["total_cost"] == pytest.approx(ctx.total_cost)
        if key == "unpriced":
            assert ctx.cost_unknown_calls == 1 and cost_meta is None
            assert trace.info.tags["roma_otel.cost_unknown_calls"] == "1"


def test_session_user_and_tags_come_from_the_execution_metadata(stored: Stored) -> None:
    explicit = stored.traces[stored.executions["explicit"].execution_id]
    assert explicit.info.tags["team"] == "travel"
    assert explicit.info.trace_metadata["mlflow.trace.session"] == "sess-42"
    assert explicit.info.trace_metadata["mlflow.trace.user"] == "ada"
    demo = stored.traces[stored.executions["demo"].execution_id]
    assert "mlflow.trace.session" not in demo.info.trace_metadata


# --- 4. the run link ---------------------------------------------------------------------------------
def test_every_trace_is_linked_to_its_run(stored: Stored) -> None:
    client = MlflowClient(stored.bridge.tracking_uri)
    for key, ctx in stored.executions.items():
        run = stored.runs[ctx.execution_id]
        found = client.search_traces(locations=[stored.experiment_id], run_id=run.info.run_id, max_results=10)
        assert [t.info.tags["execution_id"] for t in found] == [ctx.execution_id], key
        # the run's Traces tab lists the traces whose metadata names the run
        info = stored.traces[ctx.execution_id].info
        assert info.trace_metadata.get(sc.MLFLOW_SOURCE_RUN) == run.info.run_id, key


# --- 5. no false drop at exit --------------------------------------------------------------------------
EXIT_APP = """
import dspy
from opentelemetry.sdk.trace import TracerProvider
import roma_otel
from roma_otel.config import load_config

roma_otel.RomaInstrumentor().instrument(tracer_provider=TracerProvider(), config=load_config())
lm = dspy.LM("openai/gpt-4o-mini", cache=False, mock_response="[[ ## answer ## ]]\\nParis\\n\\n[[ ## completed ## ]]")
with dspy.context(lm=lm):
    for i in range(3):
        with roma_otel.execution(f"question {i}"):
            dspy.Predict("question -> answer")(question="Capital of France?")
print("DONE", flush=True)
"""


def test_exit_with_several_executions_drops_nothing(mlflow_server: Server, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "app.py"
    script.write_text(EXIT_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    env.update(MLFLOW_ENABLED="true", MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT="exit-app",
               LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(Path(__file__).resolve().parents[1]))  # fmt: skip
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-3000:]
    assert "dropped" not in proc.stderr and "still being sent" not in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.get_experiment_by_name("exit-app").experiment_id
    traces = client.search_traces(locations=[experiment_id], max_results=10)
    assert sorted(t.info.tags["mlflow.traceName"] for t in traces) == ["execution"] * 3
    assert len(client.search_runs([experiment_id])) == 3


class _SlowSink:
    """A sink whose send waits for a signal, like a tracking server taking its time with a request."""

    def __init__(self, inner: Any) -> None:
        import threading

        self.inner = inner
        self.with_cost = inner.with_cost
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, spans: Any) -> None:
        self.entered.set()
        self.release.wait(30)
        self.inner.send(spans)

    def close(self) -> None:
        self.inner.close()


def test_a_send_in_flight_at_shutdown_is_not_counted_as_dropped(make_tel: Any, tmp_path: Any) -> None:
    import logging

    from roma_otel.mlflow.traces import StoreTraceSink

    config = _config(f"sqlite:///{tmp_path}/m.db", "in-flight", capture=False)
    tel = make_tel(config)
    bridge = tel.instrumentor.mlflow_bridge
    assert bridge.flush(60)  # the store exists and the experiment too: only the trace send is left
    bridge.manager.connect()
    slow = _SlowSink(StoreTraceSink(bridge.tracking_uri, bridge.manager.experiment_id))
    bridge._sink = slow
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("roma_otel").addHandler(handler)
    try:
        with dspy.context(lm=answer_lm(answer="Paris")):
            Ask()(question="Capital of France?")
        assert slow.entered.wait(30)  # the run is written; the trace is being sent
        bridge.shutdown(timeout=0.3)
    finally:
        slow.release.set()
        logging.getLogger("roma_otel").removeHandler(handler)
    assert bridge.dropped_traces == 0 and bridge.dropped_runs == 0
    assert tel.metric_sum(sc.M_PERSISTENCE_DROPPED[0], bridge="mlflow") == 0
    assert any("still being sent" in r.getMessage() for r in records), [r.getMessage() for r in records]
    assert not any("dropped" in r.getMessage() for r in records)


# --- a ROMA solver: its own execution id, its answer -----------------------------------------------------
@pytest.mark.parametrize("capture", [True, False], ids=["capture-on", "capture-off"])
def test_a_roma_solver_trace_is_linked_and_answers_with_its_result(make_tel: Any, tmp_path: Any, capture: bool) -> None:
    from dspy.utils import DummyLM
    from roma_dspy.core.engine.solve import RecursiveSolver
    from roma_dspy.tools.base.manager import ToolkitManager

    from tests.roma_script import FINAL, GOAL, answers

    ToolkitManager._instance = None
    tel = make_tel(_config(f"sqlite:///{tmp_path}/m.db", "roma-solver", capture))
    bridge = tel.instrumentor.mlflow_bridge
    with dspy.context(lm=DummyLM(answers())):
        root = RecursiveSolver(max_depth=2).solve(GOAL)
    assert bridge.flush(60) and bridge.dropped_traces == 0
    client = MlflowClient(bridge.tracking_uri)
    experiment_id = client.get_experiment_by_name("roma-solver").experiment_id
    (run,) = client.search_runs([experiment_id])
    # The solver adopted ROMA's execution id after the root span started: the run and the trace still meet.
    assert run.data.tags["execution_id"] == root.execution_id
    (found,) = client.search_traces(locations=[experiment_id], run_id=run.info.run_id)
    info = client.get_trace(found.info.trace_id).info
    assert info.tags["execution_id"] == root.execution_id
    assert info.trace_metadata[sc.MLFLOW_SOURCE_RUN] == run.info.run_id
    if capture:  # the solved task's result, not the whole task node
        assert json.loads(info.response_preview) == FINAL
    else:
        assert json.loads(info.response_preview) == {"status": "completed", "output_type": "str"}

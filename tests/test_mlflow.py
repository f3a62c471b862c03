"""The MLflow bridge against a real ``mlflow server`` on loopback (SQLite backend) and the local SQLite store.

Every run is checked field by field against the ExecutionContext that produced it; the seed's MLflow snippets
run as written (imports aside); failures leave the program untouched and keep exit bounded.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dspy
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

import roma_otel  # noqa: E402
from roma_otel import semconv as sc  # noqa: E402
from roma_otel.config import RomaOtelConfig, default_config  # noqa: E402
from roma_otel.context import ExecutionContext, ModuleStats  # noqa: E402
from roma_otel.instrumentation.patching import ORIGINAL_ATTR  # noqa: E402
from roma_otel.mlflow import MLflowManager, RunRecord, execution_run  # noqa: E402
from roma_otel.mlflow.runs import MAX_PARAM_VALUE  # noqa: E402
from roma_otel.version import __version__  # noqa: E402
from tests.conftest import answer_lm  # noqa: E402
from tests.mlflowserver import Server, free_port  # noqa: E402

DROPPED = sc.M_PERSISTENCE_DROPPED[0]
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow


class _Records(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def roma_log() -> Iterator[list[logging.LogRecord]]:
    """roma-otel's warnings, caught on its own logger: MLflow 3.6 runs alembic's ``fileConfig`` when it
    creates a store, which replaces the root logger's handlers and with them pytest's ``caplog``."""
    records: list[logging.LogRecord] = []
    handler = _Records(records)
    logging.getLogger("roma_otel").addHandler(handler)
    yield records
    logging.getLogger("roma_otel").removeHandler(handler)


class TcpProxy:
    """A loopback port forwarding to the tracking server: closed until ``start()``, like a server coming back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


# --- helpers ------------------------------------------------------------------------------------------
class Ask(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.predict(question=question)


class QA(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generate = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.generate(question=question)


TRAINSET = [
    dspy.Example(question="Capital of France?", answer="Paris").with_inputs("question"),
    dspy.Example(question="Capital of Italy?", answer="Rome").with_inputs("question"),
    dspy.Example(question="Where is the Louvre?", answer="Paris").with_inputs("question"),
    dspy.Example(question="Where is the Eiffel Tower?", answer="Paris").with_inputs("question"),
]


def exact(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
    return bool(example.answer == pred.answer)


def paris_lm() -> Any:
    return answer_lm(reasoning="It is in France.", answer="Paris")


def mlflow_config(tracking_uri: str | None, experiment: str = "ROMA-DSPy", **options: Any) -> RomaOtelConfig:
    config = default_config()
    ml = config.observability.mlflow
    ml.enabled = True
    ml.tracking_uri = tracking_uri
    ml.experiment_name = experiment
    for key, value in options.items():
        setattr(ml, key, value)
    return config


def instrument(make_tel: Any, config: RomaOtelConfig) -> tuple[Any, Any, list[ExecutionContext]]:
    """Instrument with ``config``; returns (test telemetry, the bridge, the finished executions)."""
    tel = make_tel(config)
    finished: list[ExecutionContext] = []
    tel.instrumentor.telemetry.execution_listeners.append(finished.append)
    return tel, tel.instrumentor.mlflow_bridge, finished


def expected_metrics(ctx: ExecutionContext) -> dict[str, float]:
    """The seed's run metrics for ``ctx``, computed here independently of the bridge."""
    out = {k: float(v) for k, v in ctx.summary().items()}
    for module, stats in ctx.module_stats.items():
        out[f"{module}_calls"] = stats.calls
        out[f"{module}_tokens"] = stats.tokens
        out[f"{module}_cost"] = stats.cost
        out[f"{module}_avg_latency"] = stats.latency_ms_total / stats.calls
    calls = ctx.tool_invocations
    if calls:
        out["toolkit_success_rate"] = sum(c.success for c in calls) / len(calls)
        out["avg_tool_duration_ms"] = sum(c.duration_ms for c in calls) / len(calls)
        for toolkit in {c.toolkit_class for c in calls}:
            out[f"{toolkit}_calls"] = sum(1 for c in calls if c.toolkit_class == toolkit)
    return out


def assert_run_matches(run: Any, ctx: ExecutionContext, user_tags: dict[str, str] | None = None) -> None:
    """Every field of an execution's run, against the execution."""
    info, data = run.info, run.data
    assert info.status == ("FAILED" if ctx.status == "failed" else "FINISHED")
    assert info.run_name == ctx.task
    assert info.start_time == int(ctx.start_time * 1000)
    assert info.end_time == int(ctx.end_time * 1000)  # type: ignore[operator]
    params = {"task": ctx.task, "max_depth": str(ctx.max_depth), "config_version": ctx.config_version,
              "solver_type": ctx.solver_type}  # fmt: skip
    assert data.params == params
    tags = {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")}
    assert tags == {
        "execution_id": ctx.execution_id,
        "solver_type": ctx.solver_type,
        "roma_otel.version": __version__,
        "roma_otel.kind": "execution",
        **(user_tags or {}),
    }
    assert data.tags["mlflow.runName"] == ctx.task
    assert data.metrics == pytest.approx(expected_metrics(ctx), rel=1e-9)


def runs_of(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def traces_of(uri: str, experiment_id: str, run_id: str | None = None) -> list[Any]:
    return list(MlflowClient(uri).search_traces(locations=[experiment_id], run_id=run_id, max_results=100))


@pytest.fixture
def tracking_uri_global() -> Iterator[Any]:
    """Set MLflow's global tracking URI for a seed snippet; reset afterwards."""

    def use(uri: str) -> None:
        mlflow.set_tracking_uri(uri)

    yield use
    mlflow.set_tracking_uri(None)


async def run_snippet(code: str, namespace: dict[str, Any]) -> None:
    """Execute documentation code with top-level ``await``, as a notebook or ``python -m asyncio`` would."""
    compiled = compile(code, "<seed>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if result is not None:
        await result


# --- the seed's snippets (verbatim, except the import paths) --------------------------------------------
SEED_PROGRAMMATIC = """\
from roma_otel.mlflow import MLflowManager

# 初始化
mlflow_mgr = MLflowManager(config.observability.mlflow)
await mlflow_mgr.initialize()

# 开始运行
run_id = await mlflow_mgr.start_run(
    run_name="custom-run",
    tags={"version": "1.0", "experiment_type": "production"}
)

# 记录指标
await mlflow_mgr.log_metric("custom_metric", 42.0)
await mlflow_mgr.log_param("custom_param", "value")

# 结束运行
await mlflow_mgr.end_run(status="FINISHED")
"""

SEED_CUSTOM_METRICS = """\
# 添加自定义指标到 MLflow
async with solver.mlflow_manager.run_context():
    await solver.mlflow_manager.log_metric("custom_score", score)
    await solver.mlflow_manager.log_param("algorithm", "custom")
"""

SEED_SEARCH = """\
import mlflow

# 设置跟踪 URI
mlflow.set_tracking_uri("http://localhost:5000")

# 搜索运行
runs = mlflow.search_runs(
    experiment_names=["ROMA-DSPy"],
    filter_string="metrics.total_cost < 1.0",
    order_by=["metrics.execution_duration ASC"]
)

# 获取最佳运行
best_run = runs.sort_values("metrics.total_cost").iloc[0]
print(f"最佳运行: {best_run.run_id}")
print(f"成本: ${best_run['metrics.total_cost']:.4f}")
"""

SEED_COST_BY_DEPTH = """\
# 获取所有运行
runs = mlflow.search_runs(experiment_names=["ROMA-DSPy"])

# 成本分析
total_cost = runs["metrics.total_cost"].sum()
avg_cost = runs["metrics.total_cost"].mean()
cost_by_depth = runs.groupby("params.max_depth")["metrics.total_cost"].mean()

print(f"总花费: ${total_cost:.2f}")
print(f"平均单次花费: ${avg_cost:.4f}")
print("\\n按深度划分的成本:")
print(cost_by_depth)
"""

SEED_WITH_POSTGRES = """\
# 查询两个源
import mlflow
from roma_otel.storage.postgres import PostgresStorage

# MLflow - 高级指标
runs = mlflow.search_runs(experiment_names=["ROMA-DSPy"])

# Postgres - 详细追踪
storage = PostgresStorage(config.storage.postgres)
await storage.initialize()

for _, run in runs.iterrows():
    execution_id = run["tags.execution_id"]
    costs = await storage.get_execution_costs(execution_id)
    print(f"Run {execution_id}: ${costs['total_cost']:.4f}")
"""

SEED_TOOLKIT_TO_MLFLOW = """\
# 将工具箱指标记录到 MLflow
from roma_otel.mlflow import MLflowManager

async with mlflow_manager.run_context():
    summary = await storage.get_toolkit_metrics_summary(execution_id)

    # 记录聚合指标
    await mlflow_manager.log_metric(
        "toolkit_success_rate",
        summary["tool_invocations"]["success_rate"]
    )
    await mlflow_manager.log_metric(
        "avg_tool_duration_ms",
        summary["tool_invocations"]["avg_duration_ms"]
    )

    # 记录每工具箱指标
    for toolkit, metrics in summary["by_toolkit"].items():
        await mlflow_manager.log_metric(
            f"{toolkit}_calls",
            metrics["calls"]
        )
"""


# --- one run per execution --------------------------------------------------------------------------------
def test_demo_agent_run_in_the_default_local_store(
    make_tel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from roma_otel.demo.agent import DEMO_GOAL, run_demo_agent

    monkeypatch.chdir(tmp_path)  # no tracking URI: sqlite:///mlflow.db here, artifacts beside it
    tel, bridge, finished = instrument(make_tel, mlflow_config(None))
    assert bridge.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with roma_otel.execution(metadata={"team": "travel", "run_kind": "demo"}):
        pass  # an empty block is an execution too (its own run)
    run_demo_agent(DEMO_GOAL, max_depth=2)
    assert bridge.flush(60)
    assert (tmp_path / "mlflow.db").is_file()

    empty, demo = finished
    assert demo.task == DEMO_GOAL and demo.tool_invocations and len(demo.module_stats) == 4
    uri = bridge.tracking_uri
    runs = {r.data.tags["execution_id"]: r for r in runs_of(uri, "ROMA-DSPy")}
    assert set(runs) == {empty.execution_id, demo.execution_id}
    assert_run_matches(runs[demo.execution_id], demo)
    # A run for each execution, however bare: user tags from the execution's metadata, no task param.
    bare = runs[empty.execution_id]
    assert bare.data.tags["team"] == "travel" and bare.data.tags["run_kind"] == "demo"
    assert bare.data.params == {"config_version": "1"}
    assert bare.data.metrics["total_cost"] == 0.0 and bare.info.status == "FINISHED"

    # The demo's trace, linked to its run, holds exactly roma-otel's spans of that execution.
    run = runs[demo.execution_id]
    (trace,) = traces_of(uri, run.info.experiment_id, run.info.run_id)
    ours = [s for s in tel.spans() if s.attributes.get(sc.EXECUTION_ID) == demo.execution_id]
    trace_id = ours[0].context.trace_id
    expected = sorted(s.name for s in tel.spans() if s.context.trace_id == trace_id)
    assert sorted(s.name for s in trace.data.spans) == expected
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == sc.SPAN_EXECUTION and root.span_type == "AGENT"
    assert trace.info.tags["execution_id"] == demo.execution_id
    assert trace.info.tags["mlflow_run_id"] == run.info.run_id
    # the local store links it like a server: the run's Traces tab filters on this metadata
    assert trace.info.trace_metadata[sc.MLFLOW_SOURCE_RUN] == run.info.run_id
    assert {s.span_type for s in trace.data.spans} == {"AGENT", "CHAIN", "CHAT_MODEL", "TOOL", "TASK"}
    assert bridge.dropped_runs == bridge.dropped_traces == 0
    assert tel.metric_sum(DROPPED, bridge="mlflow") == 0


def test_seed_search_and_cost_by_depth_on_a_server(
    make_tel: Any, mlflow_server: Server, tracking_uri_global: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _tel, bridge, finished = instrument(make_tel, mlflow_config(mlflow_server.url))
    program = Ask()
    with dspy.context(lm=answer_lm(answer="Paris")):
        for depth in (1, 2, 3):  # deeper runs make more LM calls, so they cost more and take longer
            with roma_otel.execution(f"task at depth {depth}", max_depth=depth, solver_type="RecursiveSolver"):
                for _ in range(depth):
                    program(question="Capital of France?")
        with pytest.raises(RuntimeError), roma_otel.execution("fails", max_depth=2, solver_type="RecursiveSolver"):
            program(question="Capital of France?")
            program(question="Capital of France?")
            raise RuntimeError("boom")
    assert bridge.flush(30)

    by_id = {r.data.tags["execution_id"]: r for r in runs_of(mlflow_server.url, "ROMA-DSPy")}
    assert len(by_id) == 4
    for ctx in finished:
        assert_run_matches(by_id[ctx.execution_id], ctx)
    assert by_id[finished[-1].execution_id].info.status == "FAILED"

    namespace: dict[str, Any] = {}
    asyncio.run(run_snippet(SEED_SEARCH.replace("http://localhost:5000", mlflow_server.url), namespace))
    runs = namespace["runs"]
    by_duration = sorted(finished, key=lambda c: c.execution_duration)
    assert list(runs["tags.execution_id"]) == [c.execution_id for c in by_duration]
    cheapest = min(finished, key=lambda c: c.total_cost)
    assert cheapest.max_depth == 1
    assert namespace["best_run"]["tags.execution_id"] == cheapest.execution_id
    out = capsys.readouterr().out
    assert f"最佳运行: {by_id[cheapest.execution_id].info.run_id}\n" in out
    assert f"成本: ${cheapest.total_cost:.4f}\n" in out

    asyncio.run(run_snippet(SEED_COST_BY_DEPTH, namespace))
    costs = [c.total_cost for c in finished]
    assert namespace["total_cost"] == pytest.approx(sum(costs))
    assert namespace["avg_cost"] == pytest.approx(sum(costs) / 4)
    by_depth: dict[str, list[float]] = {}
    for c in finished:
        by_depth.setdefault(str(c.max_depth), []).append(c.total_cost)
    assert namespace["cost_by_depth"].to_dict() == pytest.approx({d: sum(v) / len(v) for d, v in by_depth.items()})
    assert "按深度划分的成本:" in capsys.readouterr().out


def test_traces_reach_the_server_over_otlp_linked_to_their_run(
    make_tel: Any, mlflow_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OTEL_EXPORTER_OTLP_* meant for another backend must not redirect roma-otel's MLflow traces.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{free_port()}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-mlflow-experiment-id=999")
    tel, bridge, finished = instrument(make_tel, mlflow_config(mlflow_server.url, "otlp-traces"))
    with dspy.context(lm=answer_lm(answer="Paris")):
        with roma_otel.execution("two questions", max_depth=1, solver_type="S"):
            Ask()(question="Capital of France?")
            Ask()(question="Capital of Italy?")
        Ask()(question="outside any explicit execution")  # an implicit execution: its own run and trace
    assert bridge.flush(30)
    assert bridge.traces_written == 2 and bridge.dropped_traces == 0

    runs = {r.data.tags["execution_id"]: r for r in runs_of(mlflow_server.url, "otlp-traces")}
    explicit, implicit = finished
    assert runs[implicit.execution_id].info.run_name == "Ask"  # an implicit execution is named by its module
    for ctx in finished:
        run = runs[ctx.execution_id]
        (trace,) = traces_of(mlflow_server.url, run.info.experiment_id, run.info.run_id)
        spans = [s for s in tel.spans() if s.context.trace_id == int(trace.info.trace_id[3:], 16)]
        assert sorted(s.name for s in trace.data.spans) == sorted(s.name for s in spans)
        assert {s.span_id for s in trace.data.spans} == {format(s.context.span_id, "016x") for s in spans}
        assert trace.info.tags["execution_id"] == ctx.execution_id
    (trace,) = traces_of(mlflow_server.url, runs[explicit.execution_id].info.experiment_id,
                         runs[explicit.execution_id].info.run_id)  # fmt: skip
    llm = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
    assert len(llm) == 2 and all(s.span_type in ("CHAT_MODEL", "LLM") for s in llm)


def test_server_down_at_start_then_back(make_tel: Any, mlflow_server: Server) -> None:
    proxy = TcpProxy(mlflow_server.port)  # nothing listens on proxy.port yet
    try:
        tel, bridge, finished = instrument(make_tel, mlflow_config(f"http://127.0.0.1:{proxy.port}", "comes-back"))
        with dspy.context(lm=answer_lm(answer="Paris")):
            for i in range(2):
                with roma_otel.execution(f"while down {i}", max_depth=1, solver_type="S"):
                    Ask()(question="Capital of France?")
        assert not bridge.flush(1.0)  # still queued: retried, not dropped
        assert bridge.dropped_runs == 0 and bridge.runs_written == 0

        proxy.start()
        assert bridge.flush(30)
        assert bridge.runs_written == 2 and bridge.traces_written == 2
        assert bridge.dropped_runs == bridge.dropped_traces == 0
        runs = {r.data.tags["execution_id"]: r for r in runs_of(mlflow_server.url, "comes-back")}
        for ctx in finished:
            assert_run_matches(runs[ctx.execution_id], ctx)
            run = runs[ctx.execution_id]
            assert len(traces_of(mlflow_server.url, run.info.experiment_id, run.info.run_id)) == 1
        assert tel.metric_sum(DROPPED, bridge="mlflow") == 0
    finally:
        proxy.stop()


def test_unreachable_tracking_uri_leaves_the_program_alone(
    make_tel: Any, monkeypatch: pytest.MonkeyPatch, roma_log: list[logging.LogRecord]
) -> None:
    tel, bridge, finished = instrument(
        make_tel, mlflow_config(f"http://127.0.0.1:{free_port()}", "nowhere", flush_timeout=1.0)
    )
    with dspy.context(lm=answer_lm(answer="Paris")):
        with roma_otel.execution("question", max_depth=1, solver_type="S"):
            answer = Ask()(question="Capital of France?").answer
        started = time.monotonic()
        for _ in range(5):
            Ask()(question="again")  # five implicit executions, each queued in microseconds
        assert time.monotonic() - started < 1.0
    assert answer == "Paris"
    assert len(finished) == 6 and bridge.runs_written == 0

    started = time.monotonic()
    tel.instrumentor.uninstrument()  # the bounded flush, then whatever is left is counted
    assert time.monotonic() - started < 1.0 + 1.5
    assert tel.metric_sum(DROPPED, bridge="mlflow", reason="shutdown") == 6
    assert tel.metric_sum(DROPPED, bridge="mlflow", reason="trace_shutdown") == 6
    assert bridge.dropped_runs == 6 and bridge.dropped_traces == 6
    dropped = [r for r in roma_log if "dropped" in r.getMessage()]
    assert len(dropped) == 1
    # The instrumented program still works after the bridge is gone.
    with dspy.context(lm=answer_lm(answer="Paris")):
        assert Ask()(question="Capital of France?").answer == "Paris"


def test_runs_mlflow_rejects_are_dropped_and_counted_once(
    make_tel: Any, tmp_path: Path, roma_log: list[logging.LogRecord]
) -> None:
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    tel, bridge, finished = instrument(make_tel, mlflow_config(uri, "rejects", artifact_location=str(tmp_path / "a")))
    with dspy.context(lm=answer_lm(answer="Paris")), roma_otel.execution("first", max_depth=1):
        Ask()(question="Capital of France?")
    assert bridge.flush(30) and bridge.runs_written == 1
    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("rejects").experiment_id)  # runs can't go there now

    with dspy.context(lm=answer_lm(answer="Paris")):
        for i in range(3):
            with roma_otel.execution(f"after delete {i}", max_depth=1):
                assert Ask()(question="Capital of France?").answer == "Paris"
    assert bridge.flush(30)
    assert bridge.runs_written == 1 and bridge.dropped_runs == 3, (bridge.dropped_traces, bridge.traces_written)
    assert tel.metric_sum(DROPPED, bridge="mlflow", reason="rejected") == 3
    assert len([r for r in roma_log if "dropped" in r.getMessage()]) == 1
    assert len(finished) == 4


def test_exit_with_mlflow_down_is_bounded_by_the_flush_timeout(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        import dspy
        from opentelemetry.sdk.trace import TracerProvider
        import roma_otel
        from roma_otel.config import load_config

        config = load_config()
        lm = dspy.LM("openai/gpt-4o-mini", cache=False,
                     mock_response="[[ ## answer ## ]]\\nParis\\n\\n[[ ## completed ## ]]")
        roma_otel.RomaInstrumentor().instrument(tracer_provider=TracerProvider(), config=config)
        with dspy.context(lm=lm), roma_otel.execution("question", max_depth=1):
            print(dspy.Predict("question -> answer")(question="Capital of France?").answer)
        print("DONE", time.time(), flush=True)
        """)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    env.update(
        MLFLOW_ENABLED="true",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
        ROMA_OTEL_MLFLOW_FLUSH_TIMEOUT="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "Paris"
    done = float(lines[1].split()[1])
    # The atexit flush waited its second, then the interpreter left: well under the 10 s default (the
    # slack is for interpreter shutdown on a loaded 2-core machine, which has taken 2.2 s).
    assert ended - done < 1.0 + 5.0
    assert "dropped 1 MLflow runs (shutdown)" in proc.stderr


# --- the seed's MLflowManager ---------------------------------------------------------------------------
def test_seed_manager_api_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the experiment's default artifact location is ./mlruns
    uri = f"sqlite:///{tmp_path / 'manager.db'}"
    config = mlflow_config(uri)

    async def main() -> tuple[int, dict[str, Any]]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        namespace: dict[str, Any] = {"config": config}
        await run_snippet(SEED_PROGRAMMATIC, namespace)  # creating the store takes a second or two
        stop.set()
        await task
        return ticks, namespace

    ticks, namespace = asyncio.run(main())
    assert ticks > 20  # the loop kept running while MLflow created its database and wrote the run
    manager = namespace["mlflow_mgr"]
    assert manager._initialized is True and manager.run_id is None
    run = MlflowClient(uri).get_run(namespace["run_id"])
    assert run.info.run_name == "custom-run" and run.info.status == "FINISHED"
    assert run.data.metrics == {"custom_metric": 42.0}
    assert run.data.params == {"custom_param": "value"}
    assert run.data.tags["version"] == "1.0" and run.data.tags["experiment_type"] == "production"
    assert run.data.tags["roma_otel.version"] == __version__
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "ROMA-DSPy"

    # The custom-metrics snippet: run_context starts a run, or joins the active one.
    solver = SimpleNamespace(mlflow_manager=MLflowManager(config.observability.mlflow))

    async def custom() -> list[str]:
        await run_snippet(SEED_CUSTOM_METRICS, {"solver": solver, "score": 0.87})
        joined_id = await solver.mlflow_manager.start_run(run_name="outer")
        async with solver.mlflow_manager.run_context() as inner_id:
            await solver.mlflow_manager.log_metric("inside", 1.0)
        assert inner_id == joined_id and solver.mlflow_manager.run_id == joined_id  # joined, not ended
        await solver.mlflow_manager.end_run()
        with pytest.raises(ValueError):
            async with solver.mlflow_manager.run_context(run_name="broken") as failed_id:
                raise ValueError("bad")
        with pytest.raises(RuntimeError, match="no active run"):
            await solver.mlflow_manager.log_metric("orphan", 1.0)
        return [joined_id, failed_id]

    joined_id, failed_id = asyncio.run(custom())
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in runs_of(uri, "ROMA-DSPy")}
    assert len(runs) == 4
    (custom_run,) = [r for r in runs.values() if "custom_score" in r.data.metrics]
    assert custom_run.data.metrics == {"custom_score": 0.87}
    assert custom_run.data.params == {"algorithm": "custom"} and custom_run.info.status == "FINISHED"
    assert client.get_run(joined_id).data.metrics == {"inside": 1.0}
    assert client.get_run(joined_id).info.status == "FINISHED"
    assert client.get_run(failed_id).info.status == "FAILED"


def test_seed_postgres_and_toolkit_snippets_with_both_bridges(
    make_tel: Any, pg_dsn: str, tmp_path: Path, tracking_uri_global: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from roma_otel.demo.agent import DEMO_GOAL, run_demo_agent
    from roma_otel.storage.migrate import upgrade

    upgrade(pg_dsn)
    uri = f"sqlite:///{tmp_path / 'both.db'}"
    config = mlflow_config(uri, artifact_location=str(tmp_path / "artifacts"))
    config.storage.postgres.enabled = True
    config.storage.postgres.connection_url = pg_dsn
    tel, bridge, finished = instrument(make_tel, config)
    run_demo_agent(DEMO_GOAL, max_depth=2)
    assert bridge.flush(60) and tel.instrumentor._postgres.force_flush(30_000)
    (ctx,) = finished
    (bridge_run,) = runs_of(uri, "ROMA-DSPy")
    assert_run_matches(bridge_run, ctx)

    tracking_uri_global(uri)

    async def main() -> None:
        namespace: dict[str, Any] = {"config": config}
        try:
            await run_snippet(SEED_WITH_POSTGRES, namespace)  # tags.execution_id joins the Postgres rows
            await run_snippet(
                SEED_TOOLKIT_TO_MLFLOW,
                {
                    "mlflow_manager": MLflowManager(config.observability.mlflow),
                    "storage": namespace["storage"],
                    "execution_id": ctx.execution_id,
                },
            )
        finally:
            await namespace["storage"].close()

    asyncio.run(main())
    assert capsys.readouterr().out == f"Run {ctx.execution_id}: ${ctx.total_cost:.4f}\n"
    (snippet_run,) = [r for r in runs_of(uri, "ROMA-DSPy") if r.info.run_id != bridge_run.info.run_id]
    # The toolkit figures the snippet read back from Postgres are the ones the bridge logged from the execution.
    assert snippet_run.data.metrics.keys() == {"toolkit_success_rate", "avg_tool_duration_ms",
                                               "DocSearchToolkit_calls", "CalculatorToolkit_calls"}  # fmt: skip
    for key, value in snippet_run.data.metrics.items():
        assert bridge_run.data.metrics[key] == pytest.approx(value, rel=1e-6), key


# --- log_compiles / log_evals -----------------------------------------------------------------------------
def test_log_compiles_bootstrap_fewshot_on_a_server(make_tel: Any, mlflow_server: Server, tmp_path: Path) -> None:
    _tel, bridge, finished = instrument(
        make_tel, mlflow_config(mlflow_server.url, "compiles", log_traces_from_compile=True)
    )
    optimizer = dspy.BootstrapFewShot(metric=exact, max_bootstrapped_demos=2, max_labeled_demos=0, max_rounds=1)
    with dspy.context(lm=paris_lm()):
        compiled = optimizer.compile(QA(), trainset=TRAINSET)
    assert bridge.flush(30)

    (run,) = runs_of(mlflow_server.url, "compiles")  # the teacher's program calls made no runs of their own
    assert len(finished) == 3
    assert run.info.run_name == "compile BootstrapFewShot QA" and run.info.status == "FINISHED"
    assert run.data.tags["roma_otel.kind"] == "compile"
    assert run.data.params == {
        "optimizer": "BootstrapFewShot",
        "program": "QA",
        "metric": "exact",
        "max_bootstrapped_demos": "2",
        "max_labeled_demos": "0",
        "max_rounds": "1",
        "teacher_settings": "{}",
        "error_count": "0",
        "trainset_size": "4",
    }
    metrics = run.data.metrics
    assert metrics["num_predictors"] == 1 and metrics["num_demos"] == 2
    assert metrics["program_calls"] == 3
    assert metrics["total_cost"] == pytest.approx(sum(c.total_cost for c in finished))
    assert metrics["total_tokens"] == sum(c.total_tokens for c in finished)

    client = MlflowClient(mlflow_server.url)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "compiled")] == ["compiled/generate.predict.json"]
    local = client.download_artifacts(run.info.run_id, "compiled/generate.predict.json", str(tmp_path))
    artifact = json.loads(Path(local).read_text())
    predictor = compiled.generate.predict
    assert artifact["signature"] == "question -> reasoning, answer"
    assert artifact["instructions"] == predictor.signature.instructions
    assert list(artifact["output_fields"]) == ["reasoning", "answer"]
    assert artifact["demos"] == [dict(d.toDict()) for d in predictor.demos]
    assert [d["question"] for d in artifact["demos"]] == ["Capital of France?", "Where is the Louvre?"]

    # log_traces_from_compile: the teacher's three program calls are traces linked to the compile run.
    traces = traces_of(mlflow_server.url, run.info.experiment_id, run.info.run_id)
    assert len(traces) == 3
    assert {t.info.tags["roma_otel.kind"] for t in traces} == {"compile"}


def test_compile_spans_are_dropped_by_default(make_tel: Any, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    _tel, bridge, finished = instrument(make_tel, mlflow_config(uri, artifact_location=str(tmp_path / "art")))
    optimizer = dspy.BootstrapFewShot(metric=exact, max_bootstrapped_demos=1, max_labeled_demos=0, max_rounds=1)
    with dspy.context(lm=paris_lm()):
        compiled = optimizer.compile(QA(), trainset=TRAINSET[:2])
        with roma_otel.execution("after compile", max_depth=1, solver_type="QA"):
            compiled(question="Capital of France?")
    assert bridge.flush(30)
    runs = {r.data.tags["roma_otel.kind"]: r for r in runs_of(uri, "ROMA-DSPy")}
    assert set(runs) == {"compile", "execution"}
    assert runs["compile"].data.metrics["num_demos"] == 1
    assert_run_matches(runs["execution"], finished[-1])
    experiment_id = runs["compile"].info.experiment_id
    assert traces_of(uri, experiment_id, runs["compile"].info.run_id) == []
    assert len(traces_of(uri, experiment_id)) == 1  # only the execution after compile
    assert bridge.traces_written == 1


def test_log_evals_score_table_and_traces(make_tel: Any, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'e.db'}"
    _tel, bridge, finished = instrument(make_tel, mlflow_config(uri, "evals", artifact_location=str(tmp_path / "a")))
    with dspy.context(lm=paris_lm()):
        result = dspy.Evaluate(devset=TRAINSET, metric=exact, num_threads=2)(QA())
    assert getattr(result, "score", result) == 75.0
    # DSPy 3.0.0's betas return the bare score, without per-example results: no table to log then.
    per_example = hasattr(result, "results")
    assert bridge.flush(30)

    (run,) = runs_of(uri, "evals")  # the four program calls are part of the evaluation's run
    assert len(finished) == 4
    assert run.info.run_name == "evaluate QA" and run.data.tags["roma_otel.kind"] == "evaluate"
    assert run.data.params == {"program": "QA", "metric": "exact", "devset_size": "4", "num_threads": "2"}
    metrics = run.data.metrics
    assert metrics["score"] == 75.0 and metrics["program_calls"] == 4
    assert metrics["total_cost"] == pytest.approx(sum(c.total_cost for c in finished))
    # Each example's program call is a trace (made in Evaluate's worker threads), linked to the eval run.
    traces = traces_of(uri, run.info.experiment_id, run.info.run_id)
    assert len(traces) == 4
    assert {t.info.tags["execution_id"] for t in traces} == {c.execution_id for c in finished}
    if not per_example:
        assert metrics["num_examples"] == 0 and "total_score" not in metrics
        assert [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)] == []
        return
    assert metrics["num_examples"] == 4 and metrics["total_score"] == 3

    local = MlflowClient(uri).download_artifacts(run.info.run_id, "eval_results.json", str(tmp_path / "dl"))
    table = json.loads(Path(local).read_text())
    assert table["columns"] == ["example_question", "example_answer", "pred_reasoning", "pred_answer", "exact"]
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["example_question"], r["example_answer"], r["pred_answer"], r["exact"]) for r in rows] == [
        (e.question, e.answer, "Paris", e.answer == "Paris") for e in TRAINSET
    ]


# --- living with the program's own MLflow ------------------------------------------------------------------
def test_users_own_mlflow_tracing_and_global_state_are_untouched(
    make_tel: Any, tmp_path: Path, tracking_uri_global: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the user's default experiment keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'user.db'}"
    tracking_uri_global(uri)
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    _tel, bridge, _finished = instrument(make_tel, mlflow_config(uri, "ours", artifact_location=str(tmp_path / "a")))

    @mlflow.trace
    def user_step(x: int) -> int:
        return x + 1

    assert user_step(1) == 2
    with dspy.context(lm=answer_lm(answer="Paris")):
        Ask()(question="Capital of France?")
    assert bridge.flush(30)
    if hasattr(mlflow, "flush_trace_async_logging"):
        mlflow.flush_trace_async_logging()
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    assert mlflow.active_run() is None

    client = MlflowClient(uri)
    ours = client.get_experiment_by_name("ours").experiment_id
    user_traces = traces_of(uri, "0")  # the user's default experiment
    assert [[s.name for s in t.data.spans] for t in user_traces] == [["user_step"]]
    our_traces = traces_of(uri, ours)
    assert len(our_traces) == 1 and "user_step" not in {s.name for s in our_traces[0].data.spans}


def test_disabled_bridge_starts_nothing(make_tel: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tel = make_tel(default_config())
    assert tel.instrumentor.mlflow_bridge is None
    assert not hasattr(dspy.Evaluate.__call__, ORIGINAL_ATTR)
    tel.instrumentor.uninstrument()
    monkeypatch.chdir(tmp_path)
    tel = make_tel(mlflow_config("sqlite:///unused.db"))  # nothing is written: the file is never created
    assert hasattr(dspy.Evaluate.__call__, ORIGINAL_ATTR)
    assert hasattr(dspy.BootstrapFewShot.compile, ORIGINAL_ATTR)
    tel.instrumentor.uninstrument()
    assert not hasattr(dspy.Evaluate.__call__, ORIGINAL_ATTR)
    assert not hasattr(dspy.BootstrapFewShot.compile, ORIGINAL_ATTR)
    assert not (tmp_path / "unused.db").exists()  # no execution ran: no store was made


# --- log_batch limits ------------------------------------------------------------------------------------
def test_batches_stay_within_log_batch_limits() -> None:
    run = RunRecord(key=("execution", "x"), run_name="r", start_ms=0, end_ms=1, status="FINISHED")
    for i in range(2500):
        run.add_metric(f"m{i}", i)
    for i in range(250):
        run.add_param(f"p{i}", "v" * 7000)
    for i in range(150):
        run.add_tag(f"t{i}", "x")
    run.add_metric("bad/key:with*chars", 1.0)
    run.add_metric("nan", float("nan"))  # MLflow would accept it, but it carries no information
    batches = run.batches()
    assert sum(len(m) for m, _, _ in batches) == 2501
    assert sum(len(p) for _, p, _ in batches) == 250 and sum(len(t) for *_, t in batches) == 150
    for metrics, params, tags in batches:
        assert len(metrics) <= 1000 and len(params) <= 100 and len(tags) <= 100
        assert len(metrics) + len(params) + len(tags) <= 1000
        assert len(json.dumps([metrics, params, tags])) < 1_000_000
        assert all(len(v) == MAX_PARAM_VALUE for v in params.values())
    assert "bad_key_with_chars" in run.metrics and "nan" not in run.metrics


def test_a_large_execution_is_written_whole(tmp_path: Path) -> None:
    """1,200 metrics and a 7,000-character task: several log_batch requests, param cut to MLflow's 6,000."""
    from roma_otel.mlflow.bridge import MLflowBridge

    ctx = ExecutionContext("big", task="t" * 7000, max_depth=3, solver_type="S", config_version="1")
    for i in range(300):
        ctx.module_stats[f"module{i}"] = ModuleStats(calls=1, tokens=i, cost=i / 1e6, latency_ms_total=2.0 * i)
    ctx.end_time, ctx.status = ctx.start_time + 1.5, "completed"
    uri = f"sqlite:///{tmp_path / 'big.db'}"
    config = mlflow_config(uri, "big", artifact_location=str(tmp_path / "a")).observability.mlflow
    bridge = MLflowBridge(config).start()
    try:
        bridge.on_execution(ctx)
        assert bridge.flush(60)
    finally:
        bridge.shutdown()
    (run,) = runs_of(uri, "big")
    expected = execution_run(ctx)
    assert len(run.data.metrics) == 7 + 4 * 300 == len(expected.metrics)
    assert run.data.metrics == pytest.approx(expected.metrics)
    assert run.data.params["task"] == "t" * 6000
    assert len(run.info.run_name) <= 120
    assert bridge.dropped_runs == 0


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from roma_otel.mlflow import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("runs/roma.db") == f"sqlite:///{tmp_path}/runs/roma.db"
    for uri in ("http://127.0.0.1:5000", "sqlite:///x.db", "postgresql://u@h/db", "databricks"):
        assert resolve_tracking_uri(uri) == uri


def test_roots_are_found_when_span_processors_run_on_other_threads(tmp_path: Path) -> None:
    """Under the SDK's ConcurrentMultiSpanProcessor, on_start runs on a pool thread where roma-otel's
    context variables are not set: the forwarder must still find each execution's root (it reads the
    root's start context) and write one trace per execution with all of its spans."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import ConcurrentMultiSpanProcessor, TracerProvider

    class Step(dspy.Module):
        def forward(self, x: int) -> int:
            return x

    uri = f"sqlite:///{tmp_path / 'concurrent.db'}"
    provider = TracerProvider(active_span_processor=ConcurrentMultiSpanProcessor(2))
    instrumentor = roma_otel.RomaInstrumentor()
    instrumentor.instrument(
        tracer_provider=provider,
        meter_provider=MeterProvider(),
        config=mlflow_config(uri, artifact_location=str(tmp_path / "art")),
    )
    try:
        bridge = instrumentor.mlflow_bridge
        Step()(x=1)  # an implicit execution: one span
        with roma_otel.execution("explicit", max_depth=1):
            Step()(x=2)  # the execution span and this one
        assert bridge.flush(30)
        assert bridge.traces_written == 2
        experiment_id = MlflowClient(uri).get_experiment_by_name("ROMA-DSPy").experiment_id
        sizes = sorted(len(t.data.spans) for t in traces_of(uri, experiment_id))
        assert sizes == [1, 2]
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_manager_artifacts_reach_the_configured_server(mlflow_server: Server, tmp_path: Path) -> None:
    """``log_dict``/``log_artifact`` go to the manager's tracking server, not MLflow's process-wide URI
    (which MLflow 3.6's client resolved ``mlflow-artifacts:`` against)."""
    assert mlflow.get_tracking_uri() != mlflow_server.url
    manager = MLflowManager(mlflow_config(mlflow_server.url, "manager-artifacts").observability.mlflow)
    notes = tmp_path / "notes.txt"
    notes.write_text("from a file")

    async def main() -> str:
        async with manager.run_context(run_name="artifacts") as run_id:
            await manager.log_dict({"answer": "Paris", "scores": [1, 0.5]}, "eval/summary.json")
            await manager.log_artifact(str(notes), "files")
        return run_id

    run_id = asyncio.run(main())
    client = MlflowClient(mlflow_server.url)
    summary = client.download_artifacts(run_id, "eval/summary.json", str(tmp_path / "dl"))
    assert json.loads(Path(summary).read_text()) == {"answer": "Paris", "scores": [1, 0.5]}
    assert Path(client.download_artifacts(run_id, "files/notes.txt", str(tmp_path / "dl"))).read_text() == "from a file"

"""ROMA programs (the stand-in roma_dspy package) under roma-otel, with no code change to the program."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from dspy.utils import DummyLM
from roma_dspy.config.schemas.toolkit import ToolkitConfig
from roma_dspy.core.context import ExecutionContext as RomaContext
from roma_dspy.core.engine.solve import RecursiveSolver
from roma_dspy.core.modules import Executor
from roma_dspy.core.modules.recursive_solver import RecursiveSolverModule
from roma_dspy.tools.base.manager import ToolkitManager
from roma_dspy.tools.core.echo import EchoToolkit

import roma_otel
from roma_otel import semconv as sc
from tests.roma_script import FINAL, GOAL, answers


@pytest.fixture(autouse=True)
def _fresh_manager() -> None:
    ToolkitManager._instance = None


def module_spans(tel, role: str) -> list:
    return [
        s
        for s in tel.spans()
        if (s.attributes or {}).get(sc.MODULE) == role and sc.MODULE_CLASS in s.attributes
    ]


def test_solver_run_is_one_execution_with_roles_depths_and_task_counts(tel) -> None:
    with dspy.context(lm=DummyLM(answers())):
        root = RecursiveSolver(max_depth=2, toolkit_configs=[ToolkitConfig("CalculatorToolkit")]).solve(GOAL)
    assert root.result == FINAL

    execution_span = tel.span(sc.SPAN_EXECUTION)
    attrs = execution_span.attributes
    assert attrs[sc.EXECUTION_TASK] == GOAL
    assert attrs[sc.EXECUTION_MAX_DEPTH] == 2
    assert attrs[sc.EXECUTION_SOLVER_TYPE] == "RecursiveSolver"
    assert attrs[sc.EXECUTION_STATUS] == "completed"
    # root + 2 subtasks; the solve -> asyncio.run(async_solve) nesting made no second execution
    assert (
        attrs[sc.EXECUTION_TOTAL_TASKS],
        attrs[sc.EXECUTION_COMPLETED_TASKS],
        attrs[sc.EXECUTION_FAILED_TASKS],
    ) == (
        3,
        3,
        0,
    )
    assert attrs[sc.EXECUTION_MAX_DEPTH_REACHED] == 1
    # ROMA's own execution id is adopted, so spans join ROMA's logs and rows.
    execution_id = attrs[sc.EXECUTION_ID]
    assert execution_id == root.execution_id

    # BaseModule.__call__ and the runtime go straight to forward/aforward: the roles still get spans.
    assert len(module_spans(tel, "atomizer")) == 3
    assert len(module_spans(tel, "planner")) == 1
    assert len(module_spans(tel, "executor")) == 2
    assert len(module_spans(tel, "aggregator")) == 1
    for span in tel.spans():
        assert span.attributes[sc.EXECUTION_ID] == execution_id, span.name
        assert span.context.trace_id == execution_span.context.trace_id
    depths = sorted(s.attributes[sc.TASK_DEPTH] for s in module_spans(tel, "executor"))
    assert depths == [1, 1]
    assert module_spans(tel, "planner")[0].attributes[sc.TASK_DEPTH] == 0
    # every role span sits under the execution span (possibly through other spans)
    for span in module_spans(tel, "atomizer"):
        ancestor = tel.parent_of(span)
        while ancestor is not None and ancestor.name != sc.SPAN_EXECUTION:
            ancestor = tel.parent_of(ancestor)
        assert ancestor is not None

    # LM usage is attributed to the roles, not to the Predict/ChainOfThought inside them.
    assert tel.metric_sum(sc.M_LM_CALLS[0], module="atomizer") == 3
    assert tel.metric_sum(sc.M_LM_CALLS[0], module="executor") == 2
    assert tel.metric_sum(sc.M_TASKS[0], status="completed") == 3
    assert tel.metric_sum(sc.M_EXECUTIONS[0], status="completed") == 1


def test_async_solve_and_solver_module(tel) -> None:
    with dspy.context(lm=DummyLM(answers())):
        root = asyncio.run(RecursiveSolver(max_depth=2).async_solve(GOAL))
        assert root.result == FINAL
        module = RecursiveSolverModule(solver=RecursiveSolver(max_depth=2))
        prediction = module(GOAL)
    assert prediction.result_text == FINAL
    executions = tel.spans_named(sc.SPAN_EXECUTION)
    assert len(executions) == 1  # the async_solve run
    # The module run: the outermost module call is the execution, enriched by the solver inside it.
    solver_module_span = tel.span("RecursiveSolverModule")
    attrs = solver_module_span.attributes
    assert attrs[sc.EXECUTION_IMPLICIT] is True
    assert attrs[sc.EXECUTION_SOLVER_TYPE] == "RecursiveSolver"
    assert attrs[sc.EXECUTION_TASK] == GOAL
    assert attrs[sc.EXECUTION_TOTAL_TASKS] == 3
    assert tel.metric_sum(sc.M_EXECUTIONS[0], status="completed") == 2


def test_failed_solve_counts_failed_tasks_and_raises_unchanged(tel) -> None:
    class Boom(Executor):
        async def aforward(self, goal, **kwargs):
            raise RuntimeError("executor down")

    solver = RecursiveSolver(max_depth=2, executor=Boom())
    with dspy.context(lm=DummyLM(answers())), pytest.raises(RuntimeError) as info:
        solver.solve(GOAL)
    assert "executor down" in str(info.value.__cause__)
    attrs = tel.span(sc.SPAN_EXECUTION).attributes
    assert attrs[sc.EXECUTION_STATUS] == "failed"
    assert attrs[sc.EXECUTION_FAILED_TASKS] >= 1
    assert tel.metric_sum(sc.M_EXECUTIONS[0], status="failed") == 1
    assert tel.metric_sum(sc.M_TASKS[0], status="failed") >= 1
    executor_spans = module_spans(tel, "executor")
    assert executor_spans and all(s.attributes[sc.ERROR_TYPE] == "RuntimeError" for s in executor_spans)


def test_toolkit_lifecycle_and_base_toolkit_tools(tel) -> None:
    manager = ToolkitManager.get_instance()
    configs = [ToolkitConfig("EchoToolkit"), ToolkitConfig("CalculatorToolkit")]

    async def run() -> None:
        async with roma_otel.execution("lifecycle") as ctx:
            tools = await manager.get_tools_for_execution(ctx.execution_id, None, configs)
            await manager.get_tools_for_execution(ctx.execution_id, None, configs[:1])
            assert tools["echo"]("hi") == "hi"
            assert await tools["aecho"]("ho") == "ho"
            with pytest.raises(ValueError, match="nope"):
                tools["fail"]("nope")
            assert tools["add"](2, 3) == 5
            seen = roma_otel.ExecutionContext.get()
            assert seen is ctx
            assert [e.operation for e in ctx.toolkit_events].count("create") == 2
            await manager.cleanup_execution(ctx.execution_id)

    asyncio.run(run())
    ops = [s.attributes[sc.TOOLKIT_OPERATION] for s in tel.spans() if sc.TOOLKIT_OPERATION in s.attributes]
    assert ops.count("cache_miss") == 2 and ops.count("create") == 2
    assert ops.count("cache_hit") == 1 and ops.count("cleanup") == 2
    assert tel.metric_sum(sc.M_TOOLKIT_LIFECYCLE[0], operation="cache_hit") == 1
    assert tel.metric_sum(sc.M_TOOLKIT_LIFECYCLE[0], operation="cache_miss", toolkit_class="EchoToolkit") == 1

    # BaseToolkit subclasses' public methods are tools; BaseToolkit's own helpers are not.
    names = sorted(
        s.attributes[sc.GEN_AI_TOOL_NAME] for s in tel.spans() if sc.GEN_AI_TOOL_NAME in s.attributes
    )
    assert names == ["add", "aecho", "echo", "fail"]
    failed = next(s for s in tel.spans() if s.name == f"{sc.SPAN_TOOL_PREFIX} fail")
    assert failed.attributes[sc.ERROR_TYPE] == "ValueError"
    assert failed.attributes[sc.TOOLKIT_CLASS] == "EchoToolkit"
    assert (
        tel.metric_sum(sc.M_TOOL_INVOCATIONS_FAILED[0], toolkit_class="EchoToolkit", error_type="ValueError")
        == 1
    )
    # ROMA's own tracking wrapper still ran (the program is unchanged): it recorded its events.
    assert RomaContext.get() is None


def test_toolkit_defined_after_instrument_is_traced(tel) -> None:
    class LateToolkit(EchoToolkit):
        def shout(self, text: str) -> str:
            return text.upper()

    assert LateToolkit().shout("a") == "A"
    assert tel.span(f"{sc.SPAN_TOOL_PREFIX} shout").attributes[sc.TOOLKIT_CLASS] == "LateToolkit"

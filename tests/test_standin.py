"""Tests for the ROMA (``roma_dspy``) stand-in under tests/standin, driven by real DSPy + DummyLM."""

from __future__ import annotations

import asyncio
import inspect
import re
import sys
from pathlib import Path

import pytest

STANDIN = str(Path(__file__).parent / "standin")
if STANDIN not in sys.path:
    sys.path.insert(0, STANDIN)

import dspy  # noqa: E402
from dspy.utils import DummyLM  # noqa: E402
from roma_dspy.config.schemas.toolkit import ToolkitConfig  # noqa: E402
from roma_dspy.core.context import ExecutionContext  # noqa: E402
from roma_dspy.core.context.execution_context import _execution_context  # noqa: E402
from roma_dspy.core.engine.dag import TaskDAG  # noqa: E402
from roma_dspy.core.engine.runtime import ModuleRuntime  # noqa: E402
from roma_dspy.core.engine.solve import RecursiveSolver  # noqa: E402
from roma_dspy.core.modules import (  # noqa: E402
    Aggregator,
    Atomizer,
    BaseModule,
    Executor,
    Planner,
    Verifier,
)
from roma_dspy.core.modules.recursive_solver import RecursiveSolverModule  # noqa: E402
from roma_dspy.core.signatures import TaskNode  # noqa: E402
from roma_dspy.tools.base.base import BaseToolkit  # noqa: E402
from roma_dspy.tools.base.manager import ToolkitManager  # noqa: E402
from roma_dspy.tools.core.calculator import CalculatorToolkit  # noqa: E402
from roma_dspy.tools.core.echo import EchoToolkit  # noqa: E402
from roma_dspy.types import NodeType, TaskStatus  # noqa: E402

GOAL = "Compute the project budget summary"
SUB1 = "Add the costs 2 and 3"
SUB2 = "Multiply the costs 4 and 5"
FINAL = "Budget summary: 5 and 20"


def solve_answers() -> dict:
    """DummyLM dict mode: the FIRST key (in order) contained in the last prompt message wins.

    ChatAdapter user messages look like ``[[ ## goal ## ]]\\n<goal>\\n\\nRespond with the corresponding
    output fields, starting with the field `[[ ## reasoning ## ]]`, then `[[ ## is_atomic ## ]]` ...``, so
    output-field markers identify the module and "<goal>\\n\\nRespond" a goal that is the last input field.
    """
    return {
        "[[ ## synthesized_result ## ]]": {"reasoning": "combine", "synthesized_result": FINAL},  # aggregator
        "[[ ## subtasks ## ]]": {"reasoning": "split", "subtasks": [SUB1, SUB2]},  # planner
        # root atomizer (the planner prompt also ends with GOAL but matched the key above)
        f"{GOAL}\n\nRespond": {"reasoning": "too big", "is_atomic": False, "node_type": "PLAN"},
        # atomizer of the subtasks
        "[[ ## is_atomic ## ]]": {"reasoning": "small", "is_atomic": True, "node_type": "EXECUTE"},
        f"{SUB1}\n\nRespond": {"reasoning": "2+3", "output": "5"},  # executor, subtask 1
        f"{SUB2}\n\nRespond": {"reasoning": "4*5", "output": "20"},  # executor, subtask 2
    }


@pytest.fixture
def lm():
    lm = DummyLM(solve_answers())
    with dspy.context(lm=lm):
        yield lm


class SpyExecutor(Executor):
    """Records the tools the runtime hands to Executor.aforward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_tools: list[list[str]] = []

    async def aforward(self, goal, **kwargs):
        self.seen_tools.append(sorted(t.__name__ for t in kwargs.get("tools") or []))
        return await super().aforward(goal, **kwargs)


def _exec_keys(manager: ToolkitManager, execution_id: str) -> list[str]:
    return [k for k in manager._toolkit_cache if k.startswith(f"{execution_id}:")]


def _assert_completed_tree(root: TaskNode, solver: RecursiveSolver) -> None:
    assert root.status is TaskStatus.COMPLETED
    assert root.result == FINAL
    assert root.node_type is NodeType.PLAN and root.depth == 0 and root.parent_id is None
    assert [s.goal for s in root.subtasks] == [SUB1, SUB2]
    assert [s.result for s in root.subtasks] == ["5", "20"]
    for sub in root.subtasks:
        assert sub.status is TaskStatus.COMPLETED and sub.node_type is NodeType.EXECUTE
        assert sub.depth == 1 and sub.parent_id == root.task_id
        assert sub.execution_id == root.execution_id == solver.last_dag.execution_id
        assert "forced" not in sub.metadata
    assert set(solver.last_dag.nodes) == {root.task_id, *(s.task_id for s in root.subtasks)}
    # Context reset and execution-scoped toolkits cleaned up after the run.
    assert ExecutionContext.get() is None
    manager = ToolkitManager.get_instance()
    assert root.execution_id not in manager._execution_toolkit_map
    assert _exec_keys(manager, root.execution_id) == []


def test_public_shapes():
    assert BaseModule.__call__ is not dspy.Module.__call__
    for cls in (Atomizer, Planner, Executor, Aggregator, Verifier):
        assert issubclass(cls, BaseModule) and issubclass(cls, dspy.Module)
        assert inspect.iscoroutinefunction(cls.aforward)
    params = list(inspect.signature(BaseModule.forward).parameters)
    assert params == ["self", "goal", "context", "tools", "demos", "config", "dspy_context", "call_params",
                      "call_kwargs"]
    assert list(inspect.signature(BaseModule.aforward).parameters) == params
    assert list(inspect.signature(Aggregator.aforward).parameters)[:3] == ["self", "original_goal",
                                                                          "subtasks_results"]
    assert _execution_context.name == "execution_context" and ExecutionContext._context is _execution_context
    assert isinstance(Executor("ReAct")._predictor, dspy.ReAct)
    assert isinstance(Atomizer()._predictor, dspy.ChainOfThought)
    assert isinstance(Planner("Predict")._predictor, dspy.Predict)
    assert set(inspect.signature(RecursiveSolver.solve).parameters) == {"self", "task", "dag", "depth"}
    rt_sig = inspect.signature(ModuleRuntime._execute_agent_with_tracing)
    assert list(rt_sig.parameters) == ["self", "agent_type", "task", "dag", "module", "call_kwargs"]


def test_module_call_bypasses_dspy_module_call(lm, monkeypatch):
    original = dspy.Module.__call__

    def guarded(self, *a, **k):
        assert not isinstance(self, BaseModule), "BaseModule must not go through dspy.Module.__call__"
        return original(self, *a, **k)

    monkeypatch.setattr(dspy.Module, "__call__", guarded)
    pred = Atomizer()(SUB1)
    assert pred.is_atomic is True and pred.node_type == "EXECUTE"
    verdict = Verifier(lm=DummyLM([{"reasoning": "ok", "verdict": True}]))(SUB1, candidate_output="5")
    assert verdict.verdict is True


def test_full_sync_solve(lm):
    executor = SpyExecutor()
    solver = RecursiveSolver(max_depth=2, executor=executor,
                             toolkit_configs=[ToolkitConfig("CalculatorToolkit")])
    root = solver.solve(GOAL)
    _assert_completed_tree(root, solver)
    # 1 root atomize + 1 plan + 2 sub atomize + 2 execute + 1 aggregate
    assert len(lm.history) == 7
    assert executor.seen_tools == [["add", "divide", "multiply"]] * 2
    aggregator_prompt = lm.history[-1]["messages"][-1]["content"]
    assert GOAL in aggregator_prompt and '["5", "20"]' in aggregator_prompt


def test_full_async_solve_and_event_solve(lm):
    solver = RecursiveSolver(max_depth=2, toolkit_configs=[ToolkitConfig("CalculatorToolkit")])
    root = asyncio.run(solver.async_solve(GOAL))
    _assert_completed_tree(root, solver)
    first_execution = root.execution_id
    root2 = solver.event_solve(GOAL)
    _assert_completed_tree(root2, solver)
    assert root2.execution_id != first_execution
    assert len(lm.history) == 14


def test_max_depth_forces_execution(lm):
    solver = RecursiveSolver(max_depth=1)
    root = solver.solve(GOAL)
    assert root.status is TaskStatus.COMPLETED and root.result == FINAL
    assert [s.metadata.get("forced") for s in root.subtasks] == [True, True]
    assert [s.result for s in root.subtasks] == ["5", "20"]
    assert len(lm.history) == 5  # subtasks at max depth skip the atomizer


def test_failure_marks_nodes_failed_and_still_cleans_up():
    answers = {k: v for k, v in solve_answers().items() if not k.startswith(SUB2)}  # no executor answer
    solver = RecursiveSolver(max_depth=2, toolkit_configs=[ToolkitConfig("EchoToolkit")])
    with dspy.context(lm=DummyLM(answers)), pytest.raises(RuntimeError, match="failed at depth 0"):
        solver.solve(GOAL)
    nodes = {n.goal: n for n in solver.last_dag.nodes.values()}
    assert nodes[GOAL].status is TaskStatus.FAILED
    assert nodes[SUB2].status is TaskStatus.FAILED and nodes[SUB2].error.startswith("executor:")
    assert nodes[SUB1].status is TaskStatus.COMPLETED
    assert ExecutionContext.get() is None
    assert solver.last_dag.execution_id not in ToolkitManager.get_instance()._execution_toolkit_map


def test_recursive_solver_module_copies_solver(lm):
    solver = RecursiveSolver(max_depth=2)
    module = RecursiveSolverModule(solver=solver)
    pred = module(GOAL)
    assert pred.result_text == FINAL and pred.status is TaskStatus.COMPLETED
    assert pred.completed_task.subtasks[1].result == "20"
    apred = asyncio.run(module.acall(GOAL))
    assert apred.result_text == FINAL
    assert solver.last_dag is None  # only the deep copies ran


def test_toolkit_manager_cache_reuse_and_cleanup():
    manager = ToolkitManager.get_instance()
    assert manager is ToolkitManager.get_instance()
    assert {"CalculatorToolkit", "EchoToolkit"} <= set(manager._toolkit_registry)
    calc = ToolkitConfig("CalculatorToolkit")
    only_add = ToolkitConfig("CalculatorToolkit", include_tools=["add"])

    async def scenario():
        token = ExecutionContext.set("exec-a")
        try:
            t1 = await manager.get_tools_for_execution("exec-a", None, [calc])
            t2 = await manager.get_tools_for_execution("exec-a", None, [calc])
            t3 = await manager.get_tools_for_execution("exec-a", None, [only_add])
            other = await manager.get_tools_for_execution("exec-b", None, [calc])
            keys_a = set(manager._execution_toolkit_map["exec-a"])
            await manager.cleanup_execution("exec-a")
            return t1, t2, t3, other, keys_a, ExecutionContext.get()
        finally:
            ExecutionContext.reset(token)

    t1, t2, t3, other, keys_a, ctx = asyncio.run(scenario())
    key = manager._get_toolkit_cache_key("exec-a", "CalculatorToolkit", calc)
    assert re.fullmatch(r"exec-a:CalculatorToolkit:[0-9a-f]{16}", key)
    assert keys_a == {key, manager._get_toolkit_cache_key("exec-a", "CalculatorToolkit", only_add)}
    assert sorted(t1) == ["add", "divide", "multiply"] and list(t3) == ["add"]
    assert t1["add"] is t2["add"]  # same cached toolkit instance
    assert other["add"] is not t1["add"]  # other execution -> other instance
    assert [e.operation for e in ctx.toolkit_events] == ["create", "cache_hit", "create", "create", "cleanup"]
    assert "exec-a" not in manager._execution_toolkit_map and _exec_keys(manager, "exec-a") == []
    assert len(_exec_keys(manager, "exec-b")) == 1
    asyncio.run(manager.cleanup_execution("exec-b"))
    assert _exec_keys(manager, "exec-b") == []


def test_toolkit_tools_and_invocation_tracking():
    calc, echo = CalculatorToolkit(), EchoToolkit(exclude_tools=["fail"])
    assert calc.get_available_tool_names() == {"add", "multiply", "divide"}
    assert set(echo.get_enabled_tools()) == {"echo", "aecho"}
    assert set(EchoToolkit(include_tools=["fail"]).get_enabled_tools()) == {"fail"}
    with pytest.raises(ValueError):
        CalculatorToolkit(include_tools=["nope"])
    tools = {**calc.get_enabled_tools(), **EchoToolkit().get_enabled_tools()}
    assert list(inspect.signature(tools["add"]).parameters) == ["a", "b"] and tools["add"].__name__ == "add"
    assert inspect.iscoroutinefunction(tools["aecho"])
    assert tools["add"](2, 3) == 5  # no context: works, nothing recorded

    token = ExecutionContext.set("exec-tools")
    try:
        assert tools["multiply"](4, 5) == 20
        assert asyncio.run(tools["aecho"]("hi")) == "hi"
        with pytest.raises(ZeroDivisionError):
            tools["divide"](1, 0)
        with pytest.raises(ValueError, match="nope"):
            tools["fail"]("nope")
        records = ExecutionContext.get().tool_invocations
    finally:
        ExecutionContext.reset(token)
    assert [(r.toolkit_class, r.tool_name, r.success) for r in records] == [
        ("CalculatorToolkit", "multiply", True), ("EchoToolkit", "aecho", True),
        ("CalculatorToolkit", "divide", False), ("EchoToolkit", "fail", False)]
    assert records[3].error == "ValueError: nope" and all(r.execution_id == "exec-tools" for r in records)


def test_react_executor_calls_toolkit_tools():
    lm = DummyLM({
        "[[ ## output ## ]]": {"reasoning": "used add", "output": "5.0"},  # ReAct extract step
        "observation_0": {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        "[[ ## next_thought ## ]]": {"next_thought": "add", "next_tool_name": "add",
                                     "next_tool_args": {"a": 2, "b": 3}},
    })
    dag = TaskDAG()
    runtime = ModuleRuntime(executor=Executor("ReAct"), toolkit_configs=[ToolkitConfig("CalculatorToolkit")])
    task = dag.add_node(TaskNode(goal="Add 2 and 3", execution_id=dag.execution_id))
    token = ExecutionContext.set(dag.execution_id)
    try:
        with dspy.context(lm=lm):
            done = asyncio.run(runtime.execute_async(task, dag))
        ctx = ExecutionContext.get()
        asyncio.run(ToolkitManager.get_instance().cleanup_execution(dag.execution_id))
    finally:
        ExecutionContext.reset(token)
    assert done.status is TaskStatus.COMPLETED and done.result == "5.0"
    assert [(r.tool_name, r.success) for r in ctx.tool_invocations] == [("add", True)]
    assert "[[ ## observation_0 ## ]]\n5" in lm.history[-1]["messages"][-1]["content"]


def test_external_toolkit_registration():
    class UpperToolkit(BaseToolkit):
        def upper(self, text: str) -> str:
            """Upper-case text."""
            return text.upper()

    manager = ToolkitManager.get_instance()
    manager.register_external_toolkit("UpperToolkit", UpperToolkit)
    tools = asyncio.run(manager.get_tools_for_execution("exec-up", None, [ToolkitConfig("UpperToolkit")]))
    assert tools["upper"]("x") == "X"
    asyncio.run(manager.cleanup_execution("exec-up"))
    with pytest.raises(ValueError):
        manager.register_external_toolkit("Bad", dict)  # type: ignore[arg-type]

"""Module orchestration (stand-in for ROMA's ModuleRuntime)."""

from typing import Any

import dspy

from roma_dspy.core.context import ExecutionContext
from roma_dspy.core.engine.dag import TaskDAG
from roma_dspy.core.signatures.base_models.task_node import TaskNode
from roma_dspy.tools.base.manager import ToolkitManager
from roma_dspy.types import AgentType, NodeType, TaskStatus


class ModuleRuntime:
    def __init__(self, atomizer: Any = None, planner: Any = None, executor: Any = None,
                 aggregator: Any = None, *, toolkit_configs: list[Any] | None = None,
                 toolkit_manager: ToolkitManager | None = None):
        self.atomizer, self.planner, self.executor, self.aggregator = atomizer, planner, executor, aggregator
        self.toolkit_configs = list(toolkit_configs or [])
        self.toolkit_manager = toolkit_manager or ToolkitManager.get_instance()

    async def _execute_agent_with_tracing(self, agent_type: AgentType, task: TaskNode, dag: TaskDAG,
                                          module: Any, **call_kwargs: Any) -> Any:
        # Like ROMA: inputs go in as keywords (goal=... / original_goal=..., context=None), the active DSPy
        # callbacks are passed explicitly via dspy_context, and module.aforward() is awaited directly.
        callbacks = list(getattr(dspy.settings, "callbacks", None) or [])
        call_kwargs.setdefault("dspy_context", {"callbacks": callbacks})
        try:
            return await module.aforward(**call_kwargs)
        except Exception as exc:
            task.status, task.error = TaskStatus.FAILED, f"{agent_type.value}: {exc}"
            raise

    async def atomize_async(self, task: TaskNode, dag: TaskDAG) -> TaskNode:
        task.status = TaskStatus.ATOMIZING
        result = await self._execute_agent_with_tracing(AgentType.ATOMIZER, task, dag, self.atomizer,
                                                        goal=task.goal, context=None)
        task.node_type = NodeType.EXECUTE if result.is_atomic else NodeType.PLAN
        return task

    async def plan_async(self, task: TaskNode, dag: TaskDAG) -> TaskNode:
        task.status = TaskStatus.PLANNING
        result = await self._execute_agent_with_tracing(AgentType.PLANNER, task, dag, self.planner,
                                                        goal=task.goal, context=None)
        task.subtasks = [
            dag.add_node(TaskNode(goal=str(goal), execution_id=dag.execution_id, depth=task.depth + 1,
                                  max_depth=task.max_depth), parent_id=task.task_id)
            for goal in result.subtasks
        ]
        task.status = TaskStatus.PLAN_DONE
        return task

    async def execute_async(self, task: TaskNode, dag: TaskDAG) -> TaskNode:
        task.status = TaskStatus.EXECUTING
        return await self._run_executor(task, dag)

    async def force_execute_async(self, task: TaskNode, dag: TaskDAG) -> TaskNode:
        task.node_type, task.status, task.metadata["forced"] = NodeType.EXECUTE, TaskStatus.EXECUTING, True
        return await self._run_executor(task, dag)

    async def _run_executor(self, task: TaskNode, dag: TaskDAG) -> TaskNode:
        tools: dict[str, Any] = {}
        if self.toolkit_configs:
            ctx = ExecutionContext.get()
            tools = await ToolkitManager.get_instance().get_tools_for_execution(
                dag.execution_id, ctx.file_storage if ctx else None, self.toolkit_configs)
        result = await self._execute_agent_with_tracing(AgentType.EXECUTOR, task, dag, self.executor,
                                                        goal=task.goal, context=None,
                                                        tools=list(tools.values()) or None)
        task.result, task.status = result.output, TaskStatus.COMPLETED
        return task

    async def aggregate_async(self, task: TaskNode, subtasks_results: list[Any], dag: TaskDAG) -> TaskNode:
        task.status = TaskStatus.AGGREGATING
        result = await self._execute_agent_with_tracing(AgentType.AGGREGATOR, task, dag, self.aggregator,
                                                        original_goal=task.goal, context=None,
                                                        subtasks_results=[str(r) for r in subtasks_results])
        task.result, task.status = result.synthesized_result, TaskStatus.COMPLETED
        return task

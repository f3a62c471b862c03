"""Recursive solver (stand-in for ROMA's RecursiveSolver)."""

import asyncio
from collections.abc import Callable
from typing import Any

from roma_dspy.core.context import ExecutionContext
from roma_dspy.core.engine.dag import TaskDAG
from roma_dspy.core.engine.runtime import ModuleRuntime
from roma_dspy.core.modules import Aggregator, Atomizer, Executor, Planner
from roma_dspy.core.signatures.base_models.task_node import TaskNode
from roma_dspy.tools.base.manager import ToolkitManager
from roma_dspy.types import NodeType, TaskStatus

PriorityFn = Callable[[TaskNode], int] | None


class RecursiveSolver:
    def __init__(self, config: Any = None, *, atomizer: Atomizer | None = None,
                 planner: Planner | None = None, executor: Executor | None = None,
                 aggregator: Aggregator | None = None, max_depth: int = 2,
                 toolkit_configs: list[Any] | None = None):
        self.config = config
        self.max_depth = max_depth
        self.runtime = ModuleRuntime(atomizer or Atomizer(), planner or Planner(), executor or Executor(),
                                     aggregator or Aggregator(), toolkit_configs=toolkit_configs)
        self.toolkit_manager = ToolkitManager.get_instance()
        self.last_dag: TaskDAG | None = None

    def solve(self, task: str | TaskNode, dag: TaskDAG | None = None, depth: int = 0) -> TaskNode:
        return asyncio.run(self.async_solve(task, dag, depth))

    async def async_solve(self, task: str | TaskNode, dag: TaskDAG | None = None, depth: int = 0) -> TaskNode:
        return await self._run(task, dag, depth)

    def event_solve(self, task: str | TaskNode, dag: TaskDAG | None = None, depth: int = 0,
                    priority_fn: PriorityFn = None, concurrency: int | None = None) -> TaskNode:
        return asyncio.run(self.async_event_solve(task, dag, depth, priority_fn, concurrency))

    async def async_event_solve(self, task: str | TaskNode, dag: TaskDAG | None = None, depth: int = 0,
                                priority_fn: PriorityFn = None, concurrency: int | None = None) -> TaskNode:
        # ROMA runs an event-driven scheduler here; the stand-in reuses the recursive algorithm.
        return await self._run(task, dag, depth)

    async def _run(self, task: str | TaskNode, dag: TaskDAG | None, depth: int) -> TaskNode:
        token = None
        if dag is None:  # new execution: fresh execution_id and ExecutionContext
            dag = self.last_dag = TaskDAG()
            token = ExecutionContext.set(execution_id=dag.execution_id, file_storage=None)
        if isinstance(task, str):
            task = TaskNode(goal=task, execution_id=dag.execution_id, depth=depth, max_depth=self.max_depth)
        if task.task_id not in dag.nodes:
            dag.add_node(task)
        try:
            return await self._async_solve_internal(task, dag, depth)
        except Exception as exc:  # ROMA re-raises failures as RuntimeError with task context
            raise RuntimeError(f"Task '{task.task_id}' failed at depth {task.depth}: {exc}") from exc
        finally:
            if token is not None:
                await self.toolkit_manager.cleanup_execution(dag.execution_id)
                ExecutionContext.reset(token)

    async def _async_solve_internal(self, task: TaskNode, dag: TaskDAG, depth: int) -> TaskNode:
        try:
            if task.should_force_execute():
                return await self.runtime.force_execute_async(task, dag)
            task = await self.runtime.atomize_async(task, dag)
            if task.node_type == NodeType.EXECUTE:
                return await self.runtime.execute_async(task, dag)
            task = await self.runtime.plan_async(task, dag)
            children = await asyncio.gather(*(self._async_solve_internal(s, dag, s.depth)
                                              for s in task.subtasks))
            return await self.runtime.aggregate_async(task, [c.result for c in children], dag)
        except Exception as exc:
            task.status, task.error = TaskStatus.FAILED, task.error or str(exc)
            raise

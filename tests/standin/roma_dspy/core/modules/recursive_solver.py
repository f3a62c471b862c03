"""Thin DSPy module wrapper around RecursiveSolver (as in ROMA)."""

import copy
from collections.abc import Callable
from typing import Any

import dspy

from roma_dspy.core.engine.dag import TaskDAG
from roma_dspy.core.engine.solve import RecursiveSolver


class RecursiveSolverModule(dspy.Module):
    def __init__(self, *, solver: RecursiveSolver) -> None:
        super().__init__()
        self._solver = solver
        self.runtime = solver.runtime
        self.max_depth = solver.max_depth

    def forward(self, goal: str, *, dag: TaskDAG | None = None, depth: int = 0,
                priority_fn: Callable[[Any], int] | None = None, concurrency: int | None = None):
        task = self._spawn_solver().event_solve(task=goal, dag=dag, depth=depth, priority_fn=priority_fn,
                                                     concurrency=concurrency)
        return self._to_prediction(goal, task)

    async def aforward(self, goal: str, *, dag: TaskDAG | None = None, depth: int = 0,
                       priority_fn: Callable[[Any], int] | None = None, concurrency: int | None = None):
        solver = self._spawn_solver()
        task = await solver.async_event_solve(task=goal, dag=dag, depth=depth, priority_fn=priority_fn,
                                              concurrency=concurrency)
        return self._to_prediction(goal, task)

    def _spawn_solver(self) -> RecursiveSolver:
        return copy.deepcopy(self._solver)  # isolated per call; the ToolkitManager singleton stays shared

    @staticmethod
    def _to_prediction(goal: str, task: Any) -> dspy.Prediction:
        return dspy.Prediction(goal=goal, completed_task=task, status=task.status,
                               result_text=None if task.result is None else str(task.result))

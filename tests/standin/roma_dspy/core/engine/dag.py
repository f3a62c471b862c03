"""Minimal TaskDAG (ROMA's is NetworkX-based with nested subgraphs)."""

from uuid import uuid4

from roma_dspy.core.signatures.base_models.task_node import TaskNode


class TaskDAG:
    def __init__(self, dag_id: str | None = None, parent_dag: "TaskDAG | None" = None,
                 execution_id: str | None = None):
        self.dag_id = dag_id or str(uuid4())
        self.execution_id = execution_id or str(uuid4())
        self.parent_dag = parent_dag
        self.nodes: dict[str, TaskNode] = {}

    def add_node(self, task: TaskNode, parent_id: str | None = None) -> TaskNode:
        if task.task_id in self.nodes:
            raise ValueError(f"Task {task.task_id} already exists in DAG")
        task.parent_id = parent_id or task.parent_id
        self.nodes[task.task_id] = task
        return task

    def get_node(self, task_id: str) -> TaskNode:
        return self.nodes[task_id]

    def update_node(self, task: TaskNode) -> None:
        self.nodes[task.task_id] = task

    def get_all_tasks(self, include_subgraphs: bool = True) -> list[TaskNode]:
        return list(self.nodes.values())

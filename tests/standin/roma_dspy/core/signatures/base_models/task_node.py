"""Minimal mutable TaskNode (ROMA's is an immutable pydantic model with many more fields)."""

from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from roma_dspy.types import NodeType, TaskStatus


@dataclass(eq=False)
class TaskNode:
    goal: str
    execution_id: str = ""
    depth: int = 0
    max_depth: int = 2
    task_id: str = field(default_factory=lambda: str(uuid4()))
    parent_id: str | None = None
    node_type: NodeType | None = None
    status: TaskStatus = TaskStatus.PENDING
    result: Any = None
    error: str | None = None
    subtasks: list["TaskNode"] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def should_force_execute(self) -> bool:
        return self.depth >= self.max_depth

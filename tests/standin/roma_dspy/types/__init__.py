from enum import StrEnum

from .prediction_strategy import PredictionStrategy


class TaskStatus(StrEnum):  # same (upper-case) values as ROMA
    PENDING = "PENDING"
    ATOMIZING = "ATOMIZING"
    PLANNING = "PLANNING"
    PLAN_DONE = "PLAN_DONE"
    EXECUTING = "EXECUTING"
    AGGREGATING = "AGGREGATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class NodeType(StrEnum):
    PLAN = "PLAN"
    EXECUTE = "EXECUTE"


class AgentType(StrEnum):
    ATOMIZER = "atomizer"
    PLANNER = "planner"
    EXECUTOR = "executor"
    AGGREGATOR = "aggregator"
    VERIFIER = "verifier"


__all__ = ["AgentType", "NodeType", "PredictionStrategy", "TaskStatus"]

from .base_models.task_node import TaskNode
from .signatures import (
    AggregatorSignature,
    AtomizerSignature,
    ExecutorSignature,
    PlannerSignature,
    VerifierSignature,
)

__all__ = ["AggregatorSignature", "AtomizerSignature", "ExecutorSignature", "PlannerSignature", "TaskNode",
           "VerifierSignature"]

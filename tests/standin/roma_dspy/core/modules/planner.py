from roma_dspy.core.modules.base_module import BaseModule
from roma_dspy.core.signatures.signatures import PlannerSignature


class Planner(BaseModule):
    """Decomposes a task into subtasks."""

    DEFAULT_SIGNATURE = PlannerSignature

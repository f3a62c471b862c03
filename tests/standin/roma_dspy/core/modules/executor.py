from roma_dspy.core.modules.base_module import BaseModule
from roma_dspy.core.signatures.signatures import ExecutorSignature


class Executor(BaseModule):
    """Executes atomic tasks (with tools when the strategy is ReAct)."""

    DEFAULT_SIGNATURE = ExecutorSignature

from roma_dspy.core.modules.base_module import BaseModule
from roma_dspy.core.signatures.signatures import AtomizerSignature


class Atomizer(BaseModule):
    """Decides whether a task is atomic."""

    DEFAULT_SIGNATURE = AtomizerSignature

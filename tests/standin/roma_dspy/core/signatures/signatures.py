import dspy


class AtomizerSignature(dspy.Signature):
    """Decide whether the goal can be executed directly (atomic) or must be planned."""

    goal: str = dspy.InputField()
    is_atomic: bool = dspy.OutputField()
    node_type: str = dspy.OutputField(desc="PLAN or EXECUTE")


class PlannerSignature(dspy.Signature):
    """Decompose the goal into smaller subtasks."""

    goal: str = dspy.InputField()
    subtasks: list[str] = dspy.OutputField()


class ExecutorSignature(dspy.Signature):
    """Carry out the atomic goal."""

    goal: str = dspy.InputField()
    output: str = dspy.OutputField()


class AggregatorSignature(dspy.Signature):
    """Synthesize subtask results into an answer to the original goal."""

    original_goal: str = dspy.InputField()
    subtasks_results: list[str] = dspy.InputField()
    synthesized_result: str = dspy.OutputField()


class VerifierSignature(dspy.Signature):
    """Check whether the candidate output satisfies the goal."""

    goal: str = dspy.InputField()
    candidate_output: str = dspy.InputField()
    verdict: bool = dspy.OutputField()

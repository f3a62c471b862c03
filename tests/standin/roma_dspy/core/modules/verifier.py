from typing import Any

import dspy

from roma_dspy.core.modules.base_module import BaseModule, ToolsArg
from roma_dspy.core.signatures.signatures import VerifierSignature


class Verifier(BaseModule):
    """Verifies task execution results."""

    DEFAULT_SIGNATURE = VerifierSignature

    def forward(self, goal: str, candidate_output: str, *, context: str | None = None, tools: ToolsArg = None,
                config: dict[str, Any] | None = None, dspy_context: dict[str, Any] | None = None,
                call_params: dict[str, Any] | None = None, **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, None, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return self._predictor(goal=goal, candidate_output=candidate_output, **extra)

    async def aforward(self, goal: str, candidate_output: str, *, context: str | None = None,
                       tools: ToolsArg = None, config: dict[str, Any] | None = None,
                       dspy_context: dict[str, Any] | None = None, call_params: dict[str, Any] | None = None,
                       **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, None, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return await self._predictor.acall(goal=goal, candidate_output=candidate_output, **extra)

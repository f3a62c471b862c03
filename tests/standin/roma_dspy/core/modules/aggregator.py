from collections.abc import Sequence
from typing import Any

import dspy

from roma_dspy.core.modules.base_module import BaseModule, ToolsArg
from roma_dspy.core.signatures.signatures import AggregatorSignature


class Aggregator(BaseModule):
    """Aggregates results from subtasks."""

    DEFAULT_SIGNATURE = AggregatorSignature

    def forward(self, original_goal: str, subtasks_results: Sequence[Any], *, context: str | None = None,
                tools: ToolsArg = None, config: dict[str, Any] | None = None,
                dspy_context: dict[str, Any] | None = None, call_params: dict[str, Any] | None = None,
                **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, None, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return self._predictor(original_goal=original_goal, subtasks_results=list(subtasks_results),
                                   **extra)

    async def aforward(self, original_goal: str, subtasks_results: Sequence[Any], *,
                       context: str | None = None, tools: ToolsArg = None,
                       config: dict[str, Any] | None = None, dspy_context: dict[str, Any] | None = None,
                       call_params: dict[str, Any] | None = None, **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, None, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return await self._predictor.acall(original_goal=original_goal,
                                               subtasks_results=list(subtasks_results), **extra)

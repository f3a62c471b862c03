"""Shared base class for the ROMA DSPy modules (stand-in)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from roma_dspy.types.prediction_strategy import PredictionStrategy

ToolsArg = Sequence[Any] | Mapping[str, Any] | None


class BaseModule(dspy.Module):
    DEFAULT_SIGNATURE: Any = None
    MANDATORY_TOOLKIT_NAMES: list[str] = []

    def __call__(self, *args, **kwargs):
        # Like ROMA: bypasses dspy.Module.__call__ and goes straight to forward().
        return self.forward(*args, **kwargs)

    def __init__(
        self,
        prediction_strategy: PredictionStrategy | str = PredictionStrategy.CHAIN_OF_THOUGHT,
        *,
        signature: Any = None,
        config: Any = None,
        lm: dspy.LM | None = None,
        model: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        tools: ToolsArg = None,
        config_demos: list[Any] | None = None,
        context_defaults: dict[str, Any] | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(prediction_strategy, PredictionStrategy):
            prediction_strategy = PredictionStrategy.from_string(prediction_strategy)
        self.signature = signature if signature is not None else self.DEFAULT_SIGNATURE
        self._config = config
        self._prediction_strategy = prediction_strategy
        self._strategy_kwargs = dict(strategy_kwargs)
        self._tools: dict[str, Any] = self._normalize_tools(tools)
        # Unlike ROMA, lm/model are optional: without them the globally configured dspy LM is used.
        self._lm = lm if lm is not None else (dspy.LM(model, **dict(model_config or {})) if model else None)
        self._config_demos = list(config_demos or [])
        self._context_defaults = dict(context_defaults or {})
        self._predictor_tool_ids: tuple = ()
        self._predictor = self._build_predictor(list(self._tools.values()))

    def forward(self, goal: str, *, context: str | None = None, tools: ToolsArg = None,
                demos: list[Any] | None = None, config: dict[str, Any] | None = None,
                dspy_context: dict[str, Any] | None = None, call_params: dict[str, Any] | None = None,
                **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, demos, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return self._predictor(goal=goal, **extra)

    async def aforward(self, goal: str, *, context: str | None = None, tools: ToolsArg = None,
                       demos: list[Any] | None = None, config: dict[str, Any] | None = None,
                       dspy_context: dict[str, Any] | None = None, call_params: dict[str, Any] | None = None,
                       **call_kwargs: Any):
        extra, ctx = self._prepare_call(context, tools, demos, config, dspy_context, call_params, call_kwargs)
        with dspy.context(**ctx):
            return await self._predictor.acall(goal=goal, **extra)

    @property
    def lm(self) -> dspy.LM | None:
        return self._lm

    def _prepare_call(self, context, tools, demos, config, dspy_context, call_params, call_kwargs):
        """Returns (extra predictor kwargs, dspy.context kwargs)."""
        runtime_tools = {**self._tools, **self._normalize_tools(tools)}
        is_react = self._prediction_strategy is PredictionStrategy.REACT
        if is_react and runtime_tools:
            self._ensure_predictor_tools(list(runtime_tools.values()))
        extra = {**(call_params or {}), **call_kwargs}
        merged_demos = self._config_demos + list(demos or [])
        if merged_demos and not is_react:
            extra["demos"] = merged_demos
        if config is not None and not is_react:
            extra["config"] = config
        if context is not None and "context" in self.signature.input_fields:
            extra["context"] = context
        ctx = {**self._context_defaults, **(dspy_context or {})}
        if self._lm is not None:
            ctx.setdefault("lm", self._lm)
        return extra, ctx

    def _build_predictor(self, tool_list: list[Any]):
        kwargs = dict(self._strategy_kwargs)
        if self._prediction_strategy is PredictionStrategy.REACT:
            kwargs["tools"] = tool_list
            self._predictor_tool_ids = tuple(id(t) for t in tool_list)
        return self._prediction_strategy.build(self.signature, **kwargs)

    def _ensure_predictor_tools(self, tool_list: list[Any]) -> None:
        # dspy.ReAct bakes tool names into its signature: rebuild it when the tool set changes.
        if tuple(id(t) for t in tool_list) != self._predictor_tool_ids:
            self._predictor = self._build_predictor(tool_list)

    @staticmethod
    def _normalize_tools(tools: ToolsArg) -> dict[str, Any]:
        if tools is None:
            return {}
        if isinstance(tools, Mapping):
            return dict(tools)
        return {getattr(t, "__name__", f"tool_{i}"): t for i, t in enumerate(tools)}

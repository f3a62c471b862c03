"""Optimizer scopes: a DSPy ``compile`` or ``Evaluate`` call whose inner executions belong to one MLflow run.

The scope travels in the OpenTelemetry context (which roma-otel already carries into DSPy's worker
threads), so the execution listener and the span forwarder see it wherever the program runs.
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry import context as otel_context

from roma_otel.context import COST_UNITS_PER_USD, cost_units

__all__ = ["COMPILE", "EVALUATE", "OptimizerScope", "current_scope"]

COMPILE = "compile"
EVALUATE = "evaluate"

_SCOPE_KEY = otel_context.create_key("roma_otel.mlflow.optimizer_scope")


class OptimizerScope:
    """One outermost compile or evaluate call; sums what the executions inside it cost."""

    __slots__ = ("_cost_units", "_lock", "eval_scores", "executions", "id", "kind", "total_cost", "total_tokens")

    def __init__(self, kind: str, scope_id: str) -> None:
        self.kind = kind
        self.id = scope_id
        self._lock = threading.Lock()
        self.executions = 0
        self.total_cost = 0.0
        self._cost_units = 0
        self.total_tokens = 0
        self.eval_scores: list[float] = []

    @property
    def key(self) -> tuple[str, str]:
        """The bridge's key for this scope's run (its traces are linked to the run under this key)."""
        return (self.kind, self.id)

    def add_execution(self, cost: float, tokens: int) -> None:
        with self._lock:
            self.executions += 1
            self._cost_units += cost_units(cost)
            self.total_cost = self._cost_units / COST_UNITS_PER_USD
            self.total_tokens += tokens

    def add_eval_score(self, score: float) -> None:
        with self._lock:
            self.eval_scores.append(score)

    def attach(self) -> object:
        return otel_context.attach(otel_context.set_value(_SCOPE_KEY, self))

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]


def current_scope(context: Any = None) -> OptimizerScope | None:
    """The innermost optimizer scope in ``context`` (default: the current context), or None."""
    value = otel_context.get_value(_SCOPE_KEY, context)
    return value if isinstance(value, OptimizerScope) else None

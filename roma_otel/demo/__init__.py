"""roma-otel's demo: a small ROMA-style recursive DSPy agent with real tools and an offline LM.

``run_demo_agent()`` solves the demo goal with no API key; pass ``lm=dspy.LM(...)`` to use a real model.
"""

from __future__ import annotations

from roma_otel.demo.agent import (
    DEMO_GOAL,
    Aggregator,
    Atomizer,
    DemoSolver,
    Executor,
    Planner,
    SolveResult,
    arun_demo_agent,
    build_offline_lm,
    run_demo_agent,
)
from roma_otel.demo.offline_lm import OfflineLM
from roma_otel.demo.toolkits import CalculatorToolkit, DocSearchToolkit

__all__ = [
    "DEMO_GOAL",
    "Aggregator",
    "Atomizer",
    "CalculatorToolkit",
    "DemoSolver",
    "DocSearchToolkit",
    "Executor",
    "OfflineLM",
    "Planner",
    "SolveResult",
    "arun_demo_agent",
    "build_offline_lm",
    "run_demo_agent",
]

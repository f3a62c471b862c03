"""A plain DSPy app with no roma-otel code, for ``opentelemetry-instrument`` (tests/test_zero_code.py).

It answers offline through litellm's ``mock_response``, runs a ReAct agent with a plain function tool
and a small Planner/Executor pipeline, then writes ``$ZC_READY_FILE`` and waits (up to
``$ZC_WAIT_SECONDS``) for ``$ZC_DONE_FILE`` so the test can scrape its metrics endpoint before it exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import dspy

MOCK = (
    "[[ ## next_thought ## ]]\nLook the city up.\n\n"
    "[[ ## next_tool_name ## ]]\nlookup_city\n\n"
    '[[ ## next_tool_args ## ]]\n{"city": "Rome"}\n\n'
    "[[ ## reasoning ## ]]\nIt is known.\n\n"
    "[[ ## plan ## ]]\nVisit the Colosseum.\n\n"
    "[[ ## answer ## ]]\nRome is the capital of Italy.\n\n"
    "[[ ## completed ## ]]"
)


def lookup_city(city: str) -> str:
    """Return a fact about a city."""
    return f"{city} is the capital of Italy."


class Planner(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("question -> plan")

    def forward(self, question: str) -> dspy.Prediction:
        return self.plan(question=question)


class Executor(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.agent = dspy.ReAct("question, plan -> answer", tools=[lookup_city], max_iters=1)

    def forward(self, question: str, plan: str) -> dspy.Prediction:
        return self.agent(question=question, plan=plan)


class TravelAgent(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.planner = Planner()
        self.executor = Executor()

    def forward(self, question: str) -> dspy.Prediction:
        plan = self.planner(question=question).plan
        return self.executor(question=question, plan=plan)


def main() -> int:
    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", mock_response=MOCK, cache=False))
    result = TravelAgent()(question="What is Rome?")
    print(f"answer: {result.answer}", file=sys.stderr, flush=True)

    ready = os.environ.get("ZC_READY_FILE")
    done = os.environ.get("ZC_DONE_FILE")
    if ready:
        Path(ready).write_text("ready", encoding="utf-8")
    if done:
        deadline = time.monotonic() + float(os.environ.get("ZC_WAIT_SECONDS", "60"))
        while not Path(done).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())

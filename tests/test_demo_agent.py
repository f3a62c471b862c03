"""Tests for the demo: the offline LM's real LiteLLM path, the toolkits, and full agent runs.

No mocks: every LM call goes through dspy.LM and litellm.completion (with litellm's mock_response).
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import pytest

from roma_otel.demo import (
    DEMO_GOAL,
    CalculatorToolkit,
    DocSearchToolkit,
    OfflineLM,
    SolveResult,
    build_offline_lm,
    run_demo_agent,
)
from roma_otel.demo.agent import demo_responder
from roma_otel.demo.offline_lm import parse_chat_prompt, placeholder_responder

# --- offline LM ------------------------------------------------------------------------------------------


def test_offline_lm_usage_and_cost_come_from_litellm() -> None:
    import litellm

    lm = OfflineLM(model="openai/gpt-4o-mini", responder=lambda messages: "ok")
    lm("hi")
    small = lm.history[-1]
    lm("please summarise " + "a long travel itinerary " * 200)
    large = lm.history[-1]

    for entry in (small, large):
        assert isinstance(entry["response"], litellm.ModelResponse)  # litellm built it, not us
        assert entry["usage"]["prompt_tokens"] > 0
        assert entry["usage"]["completion_tokens"] > 0
        assert entry["cost"] > 0  # priced by litellm's bundled price map
        assert entry["response_model"] == "gpt-4o-mini"
    assert large["usage"]["prompt_tokens"] > 10 * small["usage"]["prompt_tokens"]
    assert large["cost"] > small["cost"]


def test_offline_lm_serves_dspy_modules_sync_and_async() -> None:
    lm = OfflineLM(responder=placeholder_responder)
    signature = "question -> answer: str, score: int, ok: bool, tags: list[str]"
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought(signature)(question="What is in Barcelona?")
        apred = asyncio.run(dspy.Predict(signature).acall(question="And in Girona?"))
    assert (pred.score, pred.ok, pred["tags"]) == (0, True, [])
    assert isinstance(pred.reasoning, str) and isinstance(apred.answer, str)
    assert len(lm.history) == 2 and all(h["cost"] > 0 for h in lm.history)


def test_parse_chat_prompt_reads_fields_from_adapter_messages() -> None:
    signature = dspy.Signature("goal, results: list[str] -> answer: str")
    messages = dspy.ChatAdapter().format(signature, demos=[], inputs={"goal": "G", "results": ["a"]})
    prompt = parse_chat_prompt(messages)
    assert prompt.input_types == {"goal": "str", "results": "list[str]"}
    assert prompt.output_types == {"answer": "str"}
    assert prompt.inputs == {"goal": "G", "results": '["a"]'}


# --- toolkits ----------------------------------------------------------------------------------------------


def test_calculator_evaluates_arithmetic() -> None:
    calc = CalculatorToolkit()
    assert calc.evaluate("300 / 2") == "150"
    assert calc.evaluate("(2 + 3) * -4 ** 2 // 3 % 7") == str((2 + 3) * -(4**2) // 3 % 7)
    assert calc.evaluate("sqrt(16) + round(10 / 3, 2) + max(1, 2, 3)") == "10.33"
    assert calc.percent(45, 300) == 15.0


@pytest.mark.parametrize(
    ("expression", "node"),
    [
        ("__import__('os')", "ast.Call"),
        ("open('/etc/passwd').read()", "Call"),
        ("(1).__class__", "ast.Attribute"),
        ("x + 1", "ast.Name"),
        ("[1, 2]", "ast.List"),
        ("'a' * 3", "ast.Constant"),
    ],
)
def test_calculator_rejects_unsafe_input(expression: str, node: str) -> None:
    with pytest.raises(ValueError, match=node):
        CalculatorToolkit().evaluate(expression)


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "2 ** 100000", "10 ** 1000 * 10 ** 1000", "1 / 0"])
def test_calculator_guards_huge_or_undefined_results(expression: str) -> None:
    with pytest.raises(ValueError):
        CalculatorToolkit().evaluate(expression)


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("museum opening hours monday", "Museum Opening Hours"),
        ("metro ticket to the airport", "Public Transport in Barcelona"),
        ("daily budget split", "Budget Travel Tips"),
        ("lunch menu and markets", "Food and Markets"),
        ("rain in october", "Weather by Season"),
        ("Sagrada Familia and Park Guell", "Barcelona Weekend Sights"),
    ],
)
def test_search_ranks_the_right_doc_first(query: str, title: str) -> None:
    hits = DocSearchToolkit().search_docs(query, top_k=3)
    assert hits[0]["title"] == title
    assert set(hits[0]) == {"title", "snippet", "score"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_read_doc() -> None:
    docs = DocSearchToolkit()
    assert "T-casual" in docs.read_doc("public transport in barcelona")
    with pytest.raises(KeyError, match="Atlantis Guide"):
        docs.read_doc("Atlantis Guide")


# --- the agent ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_run_demo_agent_completes_with_both_tools(use_async: bool) -> None:
    lm = build_offline_lm()
    result = run_demo_agent(DEMO_GOAL, lm=lm, max_depth=2, use_async=use_async)

    assert isinstance(result, SolveResult)
    assert result.status == "completed" and result.depth == 0
    assert 2 <= len(result.subtasks) <= 3
    assert all(sub.depth == 1 and sub.status == "completed" for sub in result.subtasks)
    assert [sub.task_id for sub in result.subtasks] == [f"0.{i}" for i in range(1, len(result.subtasks) + 1)]
    # Each executor's ReAct trajectory shows the real tool calls and their real observations.
    for sub in result.subtasks:
        tools = [v for k, v in sub.trajectory.items() if k.startswith("tool_name_")]
        # the first calculator call keeps the currency and is refused; the retry computes
        assert tools == ["search_docs", "evaluate", "evaluate", "finish"]
        assert sub.trajectory["observation_1"].startswith("Execution error in evaluate")
        assert "ValueError" in sub.trajectory["observation_1"]
        assert sub.trajectory["observation_2"] == "150"  # CalculatorToolkit.evaluate("300 / 2")
        assert sub.trajectory["observation_0"][0]["title"] == "Budget Travel Tips"
    assert "300 / 2 = 150" in result.answer
    # The same calls, seen from the LM's history: every call priced, and ReAct chose both tools.
    assert lm.history and all(h["cost"] > 0 and h["usage"]["total_tokens"] > 0 for h in lm.history)
    chosen = [h["outputs"][0] for h in lm.history if "next_tool_name" in h["outputs"][0]]
    assert any("search_docs" in out for out in chosen) and any("evaluate" in out for out in chosen)


def test_atomic_goal_and_max_depth_zero_execute_directly() -> None:
    atomic = run_demo_agent("What does a T-casual ticket cost?")
    assert atomic.status == "completed" and atomic.subtasks == []
    assert atomic.tools_called() == ["search_docs", "finish"]  # no number in the goal: no calculator
    assert "Public Transport in Barcelona" in atomic.answer

    flat = run_demo_agent(DEMO_GOAL, max_depth=0)
    assert flat.subtasks == [] and flat.tools_called() == ["search_docs", "evaluate", "evaluate", "finish"]


def test_agent_does_not_depend_on_the_scripted_responder() -> None:
    # A model that answers every signature with placeholders (always "atomic", always the first tool
    # with no arguments): the agent still terminates, bounded by ReAct's max_iters.
    result = run_demo_agent(DEMO_GOAL, lm=OfflineLM(responder=placeholder_responder))
    assert result.status == "completed" and result.subtasks == []
    assert len(result.tools_called()) == 5  # Executor's default max_iters


def test_a_failing_subtask_marks_the_parent_partial() -> None:
    def responder(messages: list[dict]) -> str:
        if "Compute the daily spend" in parse_chat_prompt(messages).inputs.get("goal", ""):
            raise RuntimeError("provider unavailable")
        return demo_responder(messages)

    result = run_demo_agent(DEMO_GOAL, lm=OfflineLM(responder=responder))
    assert result.status == "partial"
    assert [sub.status for sub in result.subtasks] == ["completed", "failed"]
    assert "provider unavailable" in result.subtasks[1].answer

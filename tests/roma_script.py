"""The scripted DummyLM answers that drive the stand-in ROMA solver through a plan of two atomic subtasks.

Imports nothing from ROMA, so a test can use it before ``roma_dspy`` is imported (tests/test_roma_import_hook.py).
"""

from __future__ import annotations

from typing import Any

GOAL = "Compute the project budget summary"
SUB1 = "Add the costs 2 and 3"
SUB2 = "Multiply the costs 4 and 5"
FINAL = "Budget summary: 5 and 20"


def answers() -> dict[str, Any]:
    """DummyLM dict mode: the first key contained in the prompt's last message picks the answer."""
    return {
        "[[ ## synthesized_result ## ]]": {"reasoning": "combine", "synthesized_result": FINAL},
        "[[ ## subtasks ## ]]": {"reasoning": "split", "subtasks": [SUB1, SUB2]},
        f"{GOAL}\n\nRespond": {"reasoning": "too big", "is_atomic": False, "node_type": "PLAN"},
        "[[ ## is_atomic ## ]]": {"reasoning": "small", "is_atomic": True, "node_type": "EXECUTE"},
        f"{SUB1}\n\nRespond": {"reasoning": "2+3", "output": "5"},
        f"{SUB2}\n\nRespond": {"reasoning": "4*5", "output": "20"},
    }

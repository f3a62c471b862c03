from enum import StrEnum
from typing import Any

import dspy


class PredictionStrategy(StrEnum):
    PREDICT = "Predict"
    CHAIN_OF_THOUGHT = "ChainOfThought"
    REACT = "ReAct"

    @classmethod
    def from_string(cls, value: str) -> "PredictionStrategy":
        key = value.strip().lower().replace("-", "_")
        for member in cls:
            if key in (member.value.lower(), member.name.lower()):
                return member
        if key == "cot":
            return cls.CHAIN_OF_THOUGHT
        raise ValueError(f"Invalid prediction strategy '{value}'")

    def build(self, signature: Any, **kwargs: Any) -> Any:
        return getattr(dspy, self.value)(signature, **kwargs)

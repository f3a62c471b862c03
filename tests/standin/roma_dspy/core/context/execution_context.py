"""Execution-scoped context propagated through a contextvar (as in ROMA)."""

from contextvars import ContextVar, Token
from typing import Any, Optional

_execution_context: ContextVar[Optional["ExecutionContext"]] = ContextVar("execution_context", default=None)


class ExecutionContext:
    _context = _execution_context  # ROMA exposes the ContextVar as this class attribute

    def __init__(self, execution_id: str, file_storage: Any = None):
        self.execution_id = execution_id
        self.file_storage = file_storage
        self.toolkit_events: list[Any] = []
        self.tool_invocations: list[Any] = []

    @classmethod
    def set(cls, execution_id: str, file_storage: Any = None) -> Token:
        return cls._context.set(cls(execution_id=execution_id, file_storage=file_storage))

    @classmethod
    def get(cls) -> Optional["ExecutionContext"]:
        return cls._context.get()

    @classmethod
    def reset(cls, token: Token) -> None:
        cls._context.reset(token)

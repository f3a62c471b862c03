from .execution_context import ExecutionContext

__all__ = ["ExecutionContext"]

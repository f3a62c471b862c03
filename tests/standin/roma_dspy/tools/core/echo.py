from roma_dspy.tools.base.base import BaseToolkit


class EchoToolkit(BaseToolkit):
    """Echo tools (sync, async and always-failing) for tests."""

    def echo(self, text: str) -> str:
        """Return the text unchanged."""
        return text

    async def aecho(self, text: str) -> str:
        """Asynchronously return the text unchanged."""
        return text

    def fail(self, reason: str) -> str:
        """Always raise ValueError(reason)."""
        raise ValueError(reason)

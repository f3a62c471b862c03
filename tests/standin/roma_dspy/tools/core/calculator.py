from roma_dspy.tools.base.base import BaseToolkit


class CalculatorToolkit(BaseToolkit):
    """Basic arithmetic tools."""

    def add(self, a: float, b: float) -> float:
        """Add two numbers and return the sum."""
        return a + b

    def multiply(self, a: float, b: float) -> float:
        """Multiply two numbers and return the product."""
        return a * b

    def divide(self, a: float, b: float) -> float:
        """Divide a by b. Raises ZeroDivisionError when b is 0."""
        if b == 0:
            raise ZeroDivisionError("division by zero")
        return a / b

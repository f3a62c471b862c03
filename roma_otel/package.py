"""The instrumented library's version range (metadata only; opentelemetry-instrument checks it)."""

_instruments = ("dspy >= 3.0",)

"""The instrumented library's version range (metadata only; opentelemetry-instrument checks it)."""

# ">= 3.0.0b1" rather than ">= 3.0": a bound that names a pre-release admits pre-releases, and ROMA locks
# dspy 3.0.4b1 (opentelemetry-instrument rejects an installed version outside this range).
_instruments = ("dspy >= 3.0.0b1",)

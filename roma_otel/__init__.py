"""roma-otel: OpenTelemetry instrumentation for DSPy programs and ROMA-style recursive agents.

Zero code: ``opentelemetry-instrument python app.py``. One call: ``RomaInstrumentor().instrument()``.
The names of every span, attribute and metric are in ``roma_otel.semconv``.
"""

from __future__ import annotations

from roma_otel.config import ConfigError, RomaOtelConfig, load_config
from roma_otel.context import ExecutionContext, ToolInvocation, ToolkitEvent
from roma_otel.instrumentation import RomaInstrumentor
from roma_otel.instrumentation.executions import execution, task
from roma_otel.instrumentation.lifecycle import record_toolkit_event, toolkit_operation
from roma_otel.instrumentation.threads import bind_context
from roma_otel.instrumentation.tools import toolkit
from roma_otel.version import __version__

__all__ = [
    "ConfigError",
    "ExecutionContext",
    "RomaInstrumentor",
    "RomaOtelConfig",
    "ToolInvocation",
    "ToolkitEvent",
    "__version__",
    "bind_context",
    "execution",
    "load_config",
    "record_toolkit_event",
    "task",
    "toolkit",
    "toolkit_operation",
]

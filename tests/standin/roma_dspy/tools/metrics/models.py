from dataclasses import dataclass


@dataclass
class ToolInvocationEvent:
    execution_id: str
    toolkit_class: str
    tool_name: str
    duration_ms: float
    success: bool
    error: str | None = None


@dataclass
class ToolkitLifecycleEvent:
    execution_id: str
    operation: str  # "create" | "cache_hit" | "cleanup"
    toolkit_class: str | None
    duration_ms: float
    success: bool
    error: str | None = None

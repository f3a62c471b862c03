from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolkitConfig:
    class_name: str
    enabled: bool = True
    include_tools: list[str] | None = None
    exclude_tools: list[str] | None = None
    toolkit_config: dict[str, Any] = field(default_factory=dict)
    mandatory: bool = False

    def __post_init__(self) -> None:  # ROMA normalises None to empty containers too
        self.include_tools = list(self.include_tools or [])
        self.exclude_tools = list(self.exclude_tools or [])
        self.toolkit_config = dict(self.toolkit_config or {})

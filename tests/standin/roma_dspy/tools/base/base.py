"""Base toolkit class (stand-in for ROMA's BaseToolkit)."""

import inspect
from abc import ABC
from collections.abc import Callable
from typing import Any

from roma_dspy.tools.metrics.decorators import track_tool_invocation


class BaseToolkit(ABC):  # noqa: B024 - ROMA's hooks are abstract; here they default to no-ops
    REQUIRES_FILE_STORAGE: bool = False
    TOOLKIT_TYPE: str = "builtin"

    def __init__(self, enabled: bool = True, include_tools: list[str] | None = None,
                 exclude_tools: list[str] | None = None, file_storage: Any = None, **config: Any):
        self.enabled = enabled
        self.include_tools = list(include_tools or [])
        self.exclude_tools = list(exclude_tools or [])
        self.config = config
        self._file_storage = file_storage
        self._tools: dict[str, Callable] = {}
        if self.enabled:
            self._setup_dependencies()
            self._initialize_tools()
            self._register_all_tools()
            self._validate_tool_selection()

    def _setup_dependencies(self) -> None:  # noqa: B027
        pass

    def _initialize_tools(self) -> None:  # noqa: B027
        pass

    def get_available_tool_names(self) -> set[str]:
        """Tools = public bound methods not defined on BaseToolkit itself."""
        return {name for name, _ in inspect.getmembers(self, predicate=inspect.ismethod)
                if not name.startswith("_") and not hasattr(BaseToolkit, name)}

    def _validate_tool_selection(self) -> None:
        invalid = (set(self.include_tools) | set(self.exclude_tools)) - self.get_available_tool_names()
        if invalid:
            raise ValueError(f"Unknown tools in include/exclude: {sorted(invalid)}")

    def _register_all_tools(self) -> None:
        toolkit_class = self.__class__.__name__
        for name in sorted(self.get_available_tool_names()):
            tracker = track_tool_invocation(tool_name=name, toolkit_class=toolkit_class)
            self._tools[name] = tracker(getattr(self, name))

    def get_enabled_tools(self) -> dict[str, Callable]:
        if not self.enabled:
            return {}
        names = set(self.include_tools) if self.include_tools else set(self._tools)
        names -= set(self.exclude_tools)
        return {name: fn for name, fn in self._tools.items() if name in names}

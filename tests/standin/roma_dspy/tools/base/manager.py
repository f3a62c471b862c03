"""Toolkit manager singleton (stand-in for ROMA's ToolkitManager)."""

import hashlib
import importlib
import json
import threading
import time
from typing import Any, ClassVar

from roma_dspy.core.context import ExecutionContext
from roma_dspy.tools.base.base import BaseToolkit
from roma_dspy.tools.metrics.decorators import track_toolkit_lifecycle
from roma_dspy.tools.metrics.models import ToolkitLifecycleEvent


class ToolkitManager:
    _instance: ClassVar["ToolkitManager | None"] = None
    _lock = threading.Lock()
    _toolkit_registry: ClassVar[dict[str, type[BaseToolkit]]] = {}
    BUILTIN_TOOLKITS: ClassVar[dict[str, str]] = {
        "CalculatorToolkit": "roma_dspy.tools.core.calculator",
        "EchoToolkit": "roma_dspy.tools.core.echo",
    }

    @classmethod
    def get_instance(cls) -> "ToolkitManager":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        self._toolkit_cache: dict[str, BaseToolkit] = {}  # "execution_id:ClassName:config_hash" -> toolkit
        self._execution_toolkit_map: dict[str, set[str]] = {}  # execution_id -> cache keys
        self._cache_thread_lock = threading.Lock()
        for class_name, module_path in self.BUILTIN_TOOLKITS.items():
            self._toolkit_registry[class_name] = getattr(importlib.import_module(module_path), class_name)

    def __deepcopy__(self, memo: dict) -> "ToolkitManager":
        return self

    def register_external_toolkit(self, class_name: str, toolkit_class: type[BaseToolkit]) -> None:
        if not issubclass(toolkit_class, BaseToolkit):
            raise ValueError(f"{class_name} must inherit from BaseToolkit")
        self._toolkit_registry[class_name] = toolkit_class

    def _hash_toolkit_config(self, config: Any) -> str:
        payload = {"enabled": config.enabled, "include_tools": sorted(config.include_tools or []),
                   "exclude_tools": sorted(config.exclude_tools or []),
                   "toolkit_config": sorted((config.toolkit_config or {}).items())}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _get_toolkit_cache_key(self, execution_id: str, class_name: str, config: Any) -> str:
        safe_exec_id = execution_id.replace(":", "_").replace("|", "_")
        return f"{safe_exec_id}:{class_name}:{self._hash_toolkit_config(config)}"

    def _create_toolkit_instance(self, class_name: str, config: Any, file_storage: Any = None) -> BaseToolkit:
        if class_name not in self._toolkit_registry:
            raise ValueError(f"Unknown toolkit class: {class_name}; known: {sorted(self._toolkit_registry)}")
        return self._toolkit_registry[class_name](
            enabled=config.enabled, include_tools=config.include_tools, exclude_tools=config.exclude_tools,
            file_storage=file_storage, **(config.toolkit_config or {}))

    async def get_tools_for_execution(self, execution_id: str, file_storage: Any,
                                      toolkit_configs: list[Any]) -> dict[str, Any]:
        if not execution_id:
            raise ValueError("execution_id cannot be None or empty")
        tools: dict[str, Any] = {}
        for config in (c for c in toolkit_configs if c.enabled):
            start = time.perf_counter()
            cache_key = self._get_toolkit_cache_key(execution_id, config.class_name, config)
            with self._cache_thread_lock:
                toolkit, operation = self._toolkit_cache.get(cache_key), "cache_hit"
                if toolkit is None:
                    toolkit = self._create_toolkit_instance(config.class_name, config, file_storage)
                    self._toolkit_cache[cache_key], operation = toolkit, "create"
                self._execution_toolkit_map.setdefault(execution_id, set()).add(cache_key)
            ctx = ExecutionContext.get()
            if ctx is not None:
                ctx.toolkit_events.append(ToolkitLifecycleEvent(
                    execution_id, operation, config.class_name, (time.perf_counter() - start) * 1000, True))
            tools.update(toolkit.get_enabled_tools())
        return tools

    @track_toolkit_lifecycle("cleanup")
    async def cleanup_execution(self, execution_id: str) -> None:
        with self._cache_thread_lock:
            keys = self._execution_toolkit_map.pop(execution_id, set())
            removed = [self._toolkit_cache.pop(key) for key in keys if key in self._toolkit_cache]
        for toolkit in removed:
            if hasattr(toolkit, "cleanup"):
                await toolkit.cleanup()

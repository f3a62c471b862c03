"""Post-import hooks: patch a module when the program imports it, never by importing it ourselves.

Importing a module runs its import-time side effects (ROMA's patch litellm and CodeAct and log a line),
so roma-otel must not import what the program has not. ``ImportHooks.when_imported(name, callback)`` runs
``callback(module)`` at once when ``name`` is already in ``sys.modules``; otherwise a finder at the front
of ``sys.meta_path`` hands the import system the spec the other finders find, its loader wrapped so that
the callback runs right after the module's code has executed, before any importer gets the module.

- The module sees its own loader: the wrapper puts the original back on ``__spec__.loader`` and
  ``__loader__`` before executing it, so ``importlib.reload``, ``inspect`` and ``importlib.resources``
  work as without roma-otel. A name that is not waited for gets ``None`` from the finder at once.
- Each callback runs once, under the ``Patcher``'s lock; ``close()`` (from ``Patcher.restore_all``) drops
  the pending ones and removes the finder, so a module imported after ``uninstrument()`` is left alone.
  The finder also removes itself once every awaited module has been imported.
- Nothing is raised into the import: a failing callback is reported like an unknown shape at
  ``instrument()`` (``compat.degraded``), a failure of the hook itself is counted as an internal error.
- Not covered: a module whose spec another thread found before the finder was installed, and had not yet
  put in ``sys.modules`` when ``instrument()`` looked (the finder never sees that import).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from roma_otel.compat import degraded

__all__ = ["ImportHooks"]

logger = logging.getLogger("roma_otel")


@dataclass(frozen=True)
class _Hook:
    callback: Callable[[types.ModuleType], None]
    package: str  # for compat.degraded, when the callback fails
    what: str


def _internal_error(exc: BaseException) -> None:
    try:
        from roma_otel import telemetry

        tel = telemetry.ACTIVE
        if tel is not None:
            tel.internal_error("import_hook", exc)
        else:
            logger.warning("roma-otel: internal error in import_hook (swallowed): %r", exc)
    except Exception:  # pragma: no cover - logging itself failed
        pass


class ImportHooks:
    """Callbacks waiting for modules to be imported; thread-safe, each callback applied once."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._pending: dict[str, list[_Hook]] = {}
        self._finder: _Finder | None = None
        self._closed = False

    def when_imported(
        self, name: str, callback: Callable[[types.ModuleType], None], package: str, what: str
    ) -> None:
        """Run ``callback(module)`` now if ``name`` is imported, else right after the program imports it."""
        hook = _Hook(callback, package, what)
        with self._lock:
            if self._closed:
                return
            if name not in sys.modules:
                self._pending.setdefault(name, []).append(hook)
                self._install()
                return
        try:
            # Already in sys.modules, so this imports nothing: it returns the module, or waits for another
            # thread that is still executing it.
            module = importlib.import_module(name)
        except Exception as exc:
            logger.debug("roma-otel: %s not hooked: %r", name, exc)
            return
        self._run(module, [hook])

    def close(self) -> None:
        """Drop every pending callback and take the finder off ``sys.meta_path``."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            self._uninstall()

    # --- inside the import system ---------------------------------------------------------------
    def _waits_for(self, name: str) -> bool:
        return name in self._pending

    def _imported(self, name: str, module: types.ModuleType) -> None:
        """The wrapped loader has executed ``name``: run its callbacks (each once) and never raise."""
        try:
            with self._lock:
                hooks = self._pending.pop(name, None)
                if not self._pending:
                    self._uninstall()
            if hooks:
                self._run(sys.modules.get(name, module), hooks)
        except Exception as exc:
            _internal_error(exc)

    def _run(self, module: types.ModuleType, hooks: list[_Hook]) -> None:
        failed: list[tuple[_Hook, Exception]] = []
        with self._lock:  # restore_all holds it too: a callback never patches after uninstrument
            if self._closed:
                return
            for hook in hooks:
                try:
                    hook.callback(module)
                except Exception as exc:
                    failed.append((hook, exc))
        for hook, exc in failed:  # outside the lock: logging runs the program's handlers
            degraded.report(hook.package, hook.what, exc)

    def _install(self) -> None:
        if self._finder is None:
            self._finder = _Finder(self)
            sys.meta_path.insert(0, self._finder)

    def _uninstall(self) -> None:
        finder, self._finder = self._finder, None
        if finder is not None and any(f is finder for f in sys.meta_path):
            # A new list rather than an in-place delete: an import iterating the old one (in another
            # thread, or further up this one) must not skip the finder that moves into our slot.
            sys.meta_path = [f for f in sys.meta_path if f is not finder]


class _Finder:
    """First on ``sys.meta_path``: for an awaited module, the spec the later finders find, loader wrapped."""

    def __init__(self, hooks: ImportHooks) -> None:
        self._hooks = hooks
        self._local = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not self._hooks._waits_for(fullname):
            return None
        busy: set[str] = self._local.__dict__.setdefault("busy", set())
        if fullname in busy:  # another finder asked the import system again (importlib.util.find_spec)
            return None
        busy.add(fullname)
        try:
            spec = self._find_after_self(fullname, path, target)
        except Exception:
            return None  # the import system asks that finder itself next, and meets the same error
        finally:
            busy.discard(fullname)
        if spec is None:
            return None
        try:
            loader = spec.loader
            if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, _Loader):
                spec.loader = _Loader(loader, self._hooks, fullname)
        except Exception as exc:
            _internal_error(exc)
        return spec

    def _find_after_self(self, fullname: str, path: Any, target: Any) -> Any:
        meta_path = list(sys.meta_path)
        mine = [i for i, finder in enumerate(meta_path) if finder is self]
        if not mine:
            return None
        for finder in meta_path[mine[0] + 1 :]:  # those before this one have already answered None
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


class _Loader:
    """The original loader, with the awaited module's callbacks run once its code has executed."""

    def __init__(self, loader: Any, hooks: ImportHooks, name: str) -> None:
        self._loader = loader
        self._hooks = hooks
        self._name = name

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: types.ModuleType) -> None:
        try:  # the module keeps its own loader (reload, inspect, importlib.resources use it)
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        except Exception as exc:
            _internal_error(exc)
        self._loader.exec_module(module)  # the module's own errors propagate unchanged
        self._hooks._imported(self._name, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...: the original's
        return getattr(self._loader, name)

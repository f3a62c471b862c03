"""Record every attribute roma-otel replaces on a class or module, so uninstrument restores it exactly.

Wrappers are plain functions made with ``functools.wraps`` (cheaper per call than wrapt proxies) and
carry ``_roma_otel_original``; on a class they sit inside a ``PatchedMethod``, which pickles as the
original (see there); restoring puts back the class's own ``__dict__`` entry, or deletes ours
when the class had none, leaving no ``__wrapped__`` behind. ``when_imported`` defers patches to a
module the program has not imported yet (``imports``); restoring also drops what is still waiting.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import threading
import types
from collections.abc import Callable
from typing import Any

from roma_otel.instrumentation.imports import ImportHooks

logger = logging.getLogger("roma_otel")

_MISSING = object()
ORIGINAL_ATTR = "_roma_otel_original"


def is_patched(func: Any) -> bool:
    return getattr(func, ORIGINAL_ATTR, None) is not None


class Patcher:
    """Replaces attributes and remembers what was there; thread-safe (subclass hooks fire anywhere)."""

    def __init__(self) -> None:
        self._patches: list[tuple[Any, str, Any]] = []
        self._lock = threading.RLock()
        self._imports: ImportHooks | None = None

    def replace(self, owner: Any, name: str, new: Any) -> None:
        """Set ``owner.name = new``, remembering the owner's own previous value (or its absence)."""
        with self._lock:
            previous = owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
            if previous is _MISSING and not isinstance(owner, type):
                previous = getattr(owner, name, _MISSING)
            setattr(owner, name, new)
            self._patches.append((owner, name, previous))

    def wrap_function(self, owner: type, name: str, make_wrapper: Any) -> bool:
        """Wrap the plain function ``owner.__dict__[name]`` once; False when absent or already ours."""
        with self._lock:
            func = owner.__dict__.get(name)
            if func is None or not callable(func) or isinstance(func, staticmethod | classmethod | type):
                return False
            if is_patched(func):
                return False
            # type(), not isinstance(): wrapt proxies claim to be functions but must be bound to be called.
            wrapper = make_wrapper(func if type(func) is types.FunctionType else _bound_caller(func))
            setattr(wrapper, ORIGINAL_ATTR, func)
            self.replace(owner, name, PatchedMethod(wrapper, func))
            return True

    def when_imported(
        self, module: str, callback: Callable[[types.ModuleType], None], package: str, what: str
    ) -> None:
        """Run ``callback(module)`` now if ``module`` is imported, else once the program imports it.

        roma-otel never imports it itself. A failing callback is reported as ``what`` degraded on
        ``package`` (``compat.degraded``), never raised into the program's import.
        """
        with self._lock:
            if self._imports is None:
                self._imports = ImportHooks(self._lock)
            imports = self._imports
        imports.when_imported(module, callback, package, what)

    def restore_all(self) -> None:
        with self._lock:
            if self._imports is not None:  # first: nothing waiting patches after this
                self._imports.close()
                self._imports = None
            while self._patches:
                owner, name, previous = self._patches.pop()
                try:
                    if previous is _MISSING:
                        delattr(owner, name)
                    else:
                        setattr(owner, name, previous)
                except Exception as exc:  # pragma: no cover - a class that refuses attribute writes
                    logger.warning("roma-otel: could not restore %r.%s: %r", owner, name, exc)

    def __len__(self) -> int:
        return len(self._patches)


class PatchedMethod:
    """A wrapper as a class attribute: it binds as the function it replaces, and pickles as the original.

    cloudpickle pickles a class by value (``cloudpickle.register_pickle_by_value``, as DSPy's
    ``save(..., modules_to_serialize=...)`` does) together with every function in its ``__dict__``. A
    bare wrapper there would be pickled too, with roma-otel's globals (a ContextVar cannot be pickled):
    saving would fail, or the saved program would carry roma-otel into a process that never installed
    it. ``__reduce__`` makes the class's saved attribute the program's own function, as if roma-otel
    were not there. Binding costs a Python-level ``__get__`` (+0.2 µs per call in ``timeit``, BENCHMARKS.md).
    """

    __slots__ = ("__func__", ORIGINAL_ATTR)

    def __init__(self, function: Any, original: Any) -> None:
        self.__func__ = function
        setattr(self, ORIGINAL_ATTR, original)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.__func__
        return types.MethodType(self.__func__, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # __name__, __wrapped__, __doc__, ...: the wrapper's
        return getattr(self.__func__, name)

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return copy.copy, (getattr(self, ORIGINAL_ATTR),)  # copy.copy returns a function itself


def _bound_caller(descriptor: Any) -> Any:
    """Call a non-function class attribute (another instrumentation's wrapt proxy) the way ``self.x()`` would.

    Our wrappers call ``original(self, ...)``; a descriptor such as wrapt's FunctionWrapper must instead be
    bound first, or it never learns its instance.
    """
    if inspect.iscoroutinefunction(descriptor):

        async def call_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await descriptor.__get__(self, type(self))(*args, **kwargs)

        return functools.wraps(descriptor)(call_async)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return descriptor.__get__(self, type(self))(*args, **kwargs)

    return functools.wraps(descriptor)(call)


def install_subclass_hook(patcher: Patcher, base: type, on_new_subclass: Any) -> None:
    """Call ``on_new_subclass(cls)`` for every subclass of ``base`` defined from now on.

    Done through ``__init_subclass__`` on ``base`` (restored on uninstrument), which chains to the
    hook the base already had so the program's own class machinery keeps working.
    """
    previous = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: type, **kwargs: Any) -> None:
        if previous is not None:
            previous.__get__(None, cls)(**kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        try:
            on_new_subclass(cls)
        except Exception as exc:  # never break class creation in the observed program
            logger.warning("roma-otel: could not instrument subclass %r: %r", cls, exc)

    patcher.replace(base, "__init_subclass__", classmethod(__init_subclass__))


def all_subclasses(base: type) -> list[type]:
    seen: set[type] = set()
    out: list[type] = []
    stack = [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                out.append(sub)
                stack.append(sub)
    return out

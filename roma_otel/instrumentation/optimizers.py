"""Hooks on DSPy's ``Teleprompter.compile`` (every subclass) and ``Evaluate.__call__`` for the MLflow bridge.

An outermost compile or evaluation opens an optimizer scope (carried in the OTel context into DSPy's worker
threads) so the program calls inside it belong to one run, which the hook hands to the bridge on return.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Protocol

from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from roma_otel import telemetry
from roma_otel.instrumentation.executions import new_id
from roma_otel.instrumentation.patching import Patcher, all_subclasses, install_subclass_hook
from roma_otel.mlflow.compile import optimizer_settings
from roma_otel.mlflow.groups import COMPILE, EVALUATE, OptimizerScope, current_scope

__all__ = ["RunSink", "instrument_optimizers"]


class RunSink(Protocol):
    """Where compile/evaluate runs go (the MLflow bridge)."""

    @property
    def active(self) -> bool: ...

    @property
    def log_compiles(self) -> bool: ...

    @property
    def log_evals(self) -> bool: ...

    def submit_run(self, record: Any) -> None: ...


def _internal_error(where: str, exc: BaseException) -> None:
    tel = telemetry.ACTIVE
    if tel is not None:
        tel.internal_error(where, exc)


def _enabled(sink: RunSink) -> bool:
    return telemetry.ACTIVE is not None and sink.active and is_instrumentation_enabled()


def _arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(inspect.signature(func).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def _compile_wrapper(original: Any, sink: RunSink) -> Any:
    @functools.wraps(original)
    def compile(self: Any, student: Any, *args: Any, **kwargs: Any) -> Any:
        if not _enabled(sink) or current_scope() is not None:  # nested compiles are part of the outer one
            return original(self, student, *args, **kwargs)
        scope = OptimizerScope(COMPILE, new_id())
        start = time.time()
        settings = optimizer_settings(self) if sink.log_compiles else {}
        token = scope.attach()
        try:
            program = original(self, student, *args, **kwargs)
        except BaseException as exc:
            OptimizerScope.detach(token)
            _log_compile(sink, original, self, student, None, scope, start, settings, args, kwargs, exc)
            raise
        OptimizerScope.detach(token)
        _log_compile(sink, original, self, student, program, scope, start, settings, args, kwargs, None)
        return program

    return compile


def _log_compile(
    sink: RunSink,
    original: Any,
    optimizer: Any,
    student: Any,
    program: Any,
    scope: OptimizerScope,
    start: float,
    settings: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: BaseException | None,
) -> None:
    if not sink.log_compiles:
        return
    try:
        from roma_otel.mlflow.compile import compile_run

        bound = _arguments(original, (optimizer, student, *args), kwargs)
        sink.submit_run(
            compile_run(
                optimizer,
                student,
                program,
                scope=scope,
                start=start,
                settings=settings,
                trainset=bound.get("trainset"),
                valset=bound.get("valset"),
                error=error,
            )
        )
    except Exception as exc:
        _internal_error("mlflow.log_compile", exc)


def _evaluate_wrapper(original: Any, sink: RunSink) -> Any:
    @functools.wraps(original)
    def __call__(self: Any, program: Any, *args: Any, **kwargs: Any) -> Any:
        if not _enabled(sink):
            return original(self, program, *args, **kwargs)
        outer = current_scope()
        if outer is not None:  # an evaluation inside compile: its score goes to the compile run
            result = original(self, program, *args, **kwargs)
            score = getattr(result, "score", result)
            if outer.kind == COMPILE and isinstance(score, int | float) and not isinstance(score, bool):
                outer.add_eval_score(float(score))
            return result
        if not sink.log_evals:
            return original(self, program, *args, **kwargs)
        scope = OptimizerScope(EVALUATE, new_id())
        start = time.time()
        token = scope.attach()
        try:
            result = original(self, program, *args, **kwargs)
        except BaseException as exc:
            OptimizerScope.detach(token)
            _log_eval(sink, original, self, program, None, scope, start, args, kwargs, exc)
            raise
        OptimizerScope.detach(token)
        _log_eval(sink, original, self, program, result, scope, start, args, kwargs, None)
        return result

    return __call__


def _log_eval(
    sink: RunSink,
    original: Any,
    evaluate: Any,
    program: Any,
    result: Any,
    scope: OptimizerScope,
    start: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: BaseException | None,
) -> None:
    try:
        from roma_otel.mlflow.evals import eval_run

        bound = _arguments(original, (evaluate, program, *args), kwargs)

        def setting(name: str) -> Any:
            value = bound.get(name)
            return value if value is not None else getattr(evaluate, name, None)

        sink.submit_run(
            eval_run(
                program,
                result,
                scope=scope,
                start=start,
                metric=setting("metric"),
                devset=setting("devset"),
                num_threads=setting("num_threads"),
                error=error,
            )
        )
    except Exception as exc:
        _internal_error("mlflow.log_eval", exc)


def instrument_optimizers(patcher: Patcher, sink: RunSink) -> None:
    """Wrap ``compile`` on ``Teleprompter`` and each subclass (now and later) and ``Evaluate.__call__``."""
    from roma_otel.compat.dspy import evaluate_class, teleprompter_class

    def wrap(cls: type) -> None:
        patcher.wrap_function(cls, "compile", lambda original: _compile_wrapper(original, sink))

    teleprompter = teleprompter_class()
    if teleprompter is not None:
        for cls in (teleprompter, *all_subclasses(teleprompter)):
            wrap(cls)
        install_subclass_hook(patcher, teleprompter, wrap)
    evaluate = evaluate_class()
    if evaluate is not None:
        patcher.wrap_function(evaluate, "__call__", lambda original: _evaluate_wrapper(original, sink))

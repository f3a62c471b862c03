"""``log_compiles``: the MLflow run of one DSPy optimizer ``compile``.

Params are the optimizer's settings and the optimization metric's name; metrics are what the compile cost
and found; each compiled predictor's signature, instructions and few-shot demos become a JSON artifact.
"""

from __future__ import annotations

import json
import time
from typing import Any

from roma_otel.mlflow.groups import OptimizerScope
from roma_otel.mlflow.runs import RunRecord, metric_key, optimizer_run

__all__ = ["callable_name", "compile_run", "optimizer_settings", "predictor_artifact", "to_jsonable"]

_MAX_PARAM_JSON = 2000


def callable_name(value: Any) -> str:
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return str(name) if name else type(value).__name__


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (DSPy Examples and Predictions as dicts, anything else as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "toDict"):
        try:
            value = value.toDict()
        except Exception:
            return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    return str(value)


def _param(value: Any) -> Any:
    """An optimizer setting as a param value, or None when it is not one (data, models, programs)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if callable(value) and not hasattr(value, "toDict"):
        return callable_name(value)
    if isinstance(value, dict | list | tuple):
        items = value.values() if isinstance(value, dict) else value
        if any(hasattr(item, "toDict") or hasattr(item, "named_predictors") for item in items):
            return None  # examples or programs are data, not settings
        text = json.dumps(to_jsonable(value), default=str)
        return text if len(text) <= _MAX_PARAM_JSON else None
    return None


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in fields.items():
        extra = getattr(info, "json_schema_extra", None) or {}
        out[name] = {"desc": extra.get("desc"), "prefix": extra.get("prefix")}
    return out


def predictor_artifact(name: str, predictor: Any) -> dict[str, Any]:
    """One compiled predictor: its signature, instructions and few-shot demos."""
    signature = getattr(predictor, "signature", None)
    return {
        "name": name,
        "predictor": type(predictor).__name__,
        "signature": getattr(signature, "signature", None) or str(signature),
        "instructions": getattr(signature, "instructions", None),
        "input_fields": _fields(getattr(signature, "input_fields", {}) or {}),
        "output_fields": _fields(getattr(signature, "output_fields", {}) or {}),
        "demos": [to_jsonable(d) for d in getattr(predictor, "demos", []) or []],
    }


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """The optimizer's settings as constructed: take this before ``compile`` adds its working state."""
    try:
        settings = optimizer.get_params() if hasattr(optimizer, "get_params") else vars(optimizer)
        return {k: v for k, v in dict(settings).items() if not str(k).startswith("_")}
    except Exception:
        return {}


def compile_run(
    optimizer: Any,
    student: Any,
    program: Any,
    *,
    scope: OptimizerScope,
    start: float,
    settings: dict[str, Any] | None = None,
    trainset: Any = None,
    valset: Any = None,
    error: BaseException | None = None,
) -> RunRecord:
    """The run for ``optimizer.compile(student, ...)`` that returned ``program`` (or raised ``error``)."""
    end = time.time()
    opt_name, program_name = type(optimizer).__name__, type(student).__name__
    run = optimizer_run(scope.key, "compile", f"compile {opt_name} {program_name}", start, end, error)
    run.add_tag("optimizer", opt_name)
    run.add_tag("program", program_name)

    run.add_param("optimizer", opt_name)
    run.add_param("program", program_name)
    settings = dict(settings if settings is not None else optimizer_settings(optimizer))
    metric = settings.pop("metric", None)
    run.add_param("metric", callable_name(metric) if metric is not None else None)
    for key, value in settings.items():
        if (param := _param(value)) is not None:
            run.add_param(key, param)
    for name, data in (("trainset_size", trainset), ("valset_size", valset)):
        if data is not None and hasattr(data, "__len__"):
            run.add_param(name, len(data))

    run.add_metric("compile_duration", end - start)
    run.add_metric("program_calls", scope.executions)
    run.add_metric("total_cost", round(scope.total_cost, 10))
    run.add_metric("total_tokens", scope.total_tokens)
    best = max(scope.eval_scores) if scope.eval_scores else getattr(program, "score", None)
    run.add_metric("best_score", best)

    if program is not None and hasattr(program, "named_predictors"):
        predictors = list(program.named_predictors())
        run.add_metric("num_predictors", len(predictors))
        run.add_metric("num_demos", sum(len(getattr(p, "demos", []) or []) for _, p in predictors))
        for name, predictor in predictors:
            run.artifacts[f"compiled/{metric_key(name)}.json"] = predictor_artifact(name, predictor)
    return run

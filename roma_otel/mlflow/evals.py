"""``log_evals``: the MLflow run of one ``dspy.Evaluate`` call.

The score is a metric; the per-example results (example fields, prediction fields, metric value) are a
table artifact in MLflow's ``{"columns": [...], "data": [...]}`` JSON layout.
"""

from __future__ import annotations

import time
from typing import Any

from roma_otel.mlflow.compile import callable_name, to_jsonable
from roma_otel.mlflow.groups import OptimizerScope
from roma_otel.mlflow.runs import RunRecord, optimizer_run

__all__ = ["RESULTS_ARTIFACT", "eval_run", "results_table"]

RESULTS_ARTIFACT = "eval_results.json"


def _score_value(score: Any) -> Any:
    if isinstance(score, bool):
        return float(score)
    if isinstance(score, int | float):
        return score
    value = getattr(score, "score", None)  # dspy.Prediction(score=...) from feedback metrics
    return value if isinstance(value, int | float) else to_jsonable(score)


def results_table(results: list[Any], metric_name: str) -> dict[str, Any]:
    """(example, prediction, score) triples as one row each: ``example_*``, ``pred_*`` and the metric column."""
    rows: list[dict[str, Any]] = []
    for item in results:
        try:
            example, prediction, score = item
        except (TypeError, ValueError):
            continue
        row: dict[str, Any] = {}
        example_data = to_jsonable(example)
        if isinstance(example_data, dict):
            row.update({f"example_{k}": v for k, v in example_data.items()})
        prediction_data = to_jsonable(prediction)
        if isinstance(prediction_data, dict):
            row.update({f"pred_{k}": v for k, v in prediction_data.items()})
        row[metric_name] = _score_value(score)
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def eval_run(
    program: Any,
    result: Any,
    *,
    scope: OptimizerScope,
    start: float,
    metric: Any = None,
    devset: Any = None,
    num_threads: Any = None,
    error: BaseException | None = None,
) -> RunRecord:
    """The run for ``dspy.Evaluate(...)(program)`` that returned ``result`` (or raised ``error``)."""
    end = time.time()
    program_name = type(program).__name__
    metric_name = callable_name(metric) if metric is not None else "score"
    run = optimizer_run(scope.key, "evaluate", f"evaluate {program_name}", start, end, error)
    run.add_tag("program", program_name)
    run.add_param("program", program_name)
    run.add_param("metric", metric_name)
    if devset is not None and hasattr(devset, "__len__"):
        run.add_param("devset_size", len(devset))
    run.add_param("num_threads", num_threads)

    score = getattr(result, "score", result)
    run.add_metric("score", score)
    results = getattr(result, "results", None) or []
    scores = [s for *_, s in (r for r in results if isinstance(r, tuple) and len(r) == 3)]
    numeric = [float(v) for s in scores if isinstance(v := _score_value(s), int | float)]
    run.add_metric("num_examples", len(results))
    if numeric:
        run.add_metric("total_score", sum(numeric))
    run.add_metric("eval_duration", end - start)
    run.add_metric("program_calls", scope.executions)
    run.add_metric("total_cost", round(scope.total_cost, 10))
    run.add_metric("total_tokens", scope.total_tokens)
    if results:
        run.artifacts[RESULTS_ARTIFACT] = results_table(list(results), metric_name)
    return run

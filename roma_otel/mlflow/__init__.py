"""The MLflow bridge: one run per execution, compile and evaluate runs, traces, and the seed's ``MLflowManager``.

Enabled by ``observability.mlflow.enabled`` (or ``MLFLOW_ENABLED=true``); needs ``pip install 'roma-otel[mlflow]'``.
Nothing here imports MLflow until it is first used.
"""

from __future__ import annotations

from roma_otel.mlflow.bridge import MLflowBridge
from roma_otel.mlflow.manager import MLflowManager, default_tracking_uri, resolve_tracking_uri
from roma_otel.mlflow.runs import RunRecord, execution_run, toolkit_summary

__all__ = [
    "MLflowBridge",
    "MLflowManager",
    "RunRecord",
    "default_tracking_uri",
    "execution_run",
    "resolve_tracking_uri",
    "toolkit_summary",
]

"""MLflow's APIs as they differ from 3.6 (ROMA's lock) to the newest, behind one set of calls.

What differs, and how each call copes, by capability rather than by version string:

- ``Span.from_otel_proto`` takes ``resource=`` only from 3.14: passed when the signature accepts it, so
  older MLflow converts the spans without their resource (service name) instead of failing.
- A store's ``log_spans`` takes several traces in one call only from 3.12: spans are always sent one
  trace per call, which every version accepts.
- Root-span attributes named ``mlflow.traceTag.<key>`` become trace tags only from 3.13, and no span
  attribute sets trace metadata: a trace's tags and metadata are written with ``start_trace`` before its
  spans, which every version accepts (``start_trace``).
- Per-span cost (``mlflow.llm.cost``) exists only in newer MLflow: roma-otel's cost is sent as MLflow's
  only where the installed MLflow has it (``traces_have_cost``).
- Before 3.7, ``MlflowClient(tracking_uri=...).log_dict`` resolved ``mlflow-artifacts:`` URIs against the
  process-wide tracking URI instead of the client's (so it failed or wrote to another server): artifacts
  go through an artifact repository built with the client's tracking URI, the same on every version.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

__all__ = ["ArtifactWriter", "log_spans_per_trace", "spans_from_request", "start_trace", "traces_have_cost"]


@cache
def _proto_takes_resource() -> bool:
    from mlflow.entities.span import Span

    try:
        return "resource" in inspect.signature(Span.from_otel_proto).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-implemented or wrapped method
        return False


def spans_from_request(request: Any) -> list[Any]:
    """MLflow ``Span`` entities from an OTLP ``ExportTraceServiceRequest``, with their resource when
    the installed MLflow can keep it."""
    from mlflow.entities.span import Span

    with_resource = _proto_takes_resource()
    out = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for proto in scope_spans.spans:
                if with_resource:
                    out.append(Span.from_otel_proto(proto, resource=resource_spans.resource))
                else:
                    out.append(Span.from_otel_proto(proto))
    return out


@cache
def traces_have_cost() -> bool:
    """The installed MLflow keeps a per-span cost (``mlflow.llm.cost``: 3.17 does, 3.6 does not; without
    it the attribute would only be noise)."""
    try:
        from mlflow.tracing.constant import SpanAttributeKey
    except ImportError:  # pragma: no cover
        return False
    return hasattr(SpanAttributeKey, "LLM_COST")


def log_spans_per_trace(client: Any, location: str, spans: Sequence[Any]) -> None:
    """``client.log_spans`` once per trace id, in first-seen order (MLflow < 3.12 rejects mixed batches)."""
    by_trace: dict[str, list[Any]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    for trace_spans in by_trace.values():
        client.log_spans(location, trace_spans)


def start_trace(
    client: Any,
    trace_id: str,
    experiment_id: str,
    *,
    request_time_ms: int,
    duration_ms: int,
    ok: bool,
    metadata: Mapping[str, str],
    tags: Mapping[str, str],
) -> None:
    """Create the trace's info (its metadata and tags) before its spans are logged.

    The one call that sets trace *metadata* (the run link ``mlflow.sourceRun``, session, user) and tags
    the same way from 3.6 to the newest, locally and on a server. It must come first: 3.6 replaces a
    trace's tags and metadata when ``start_trace`` meets an existing trace (dropping what ``log_spans``
    derived from the spans), while 3.17 merges, and still derives token usage and cost from spans that
    come after as long as ``start_trace`` supplied none.
    """
    from mlflow.entities import TraceInfo
    from mlflow.entities.trace_location import TraceLocation
    from mlflow.entities.trace_state import TraceState

    client.start_trace(
        TraceInfo(
            trace_id=trace_id,
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=request_time_ms,
            state=TraceState.OK if ok else TraceState.ERROR,
            execution_duration=duration_ms,
            trace_metadata=dict(metadata),
            tags=dict(tags),
        )
    )


class ArtifactWriter:
    """Writes run artifacts through an artifact repository resolved with an explicit tracking URI.

    The repository of each run is cached (a bounded LRU), as ``MlflowClient`` does, so many artifacts of
    one run cost one ``get_run``.
    """

    _MAX_REPOS = 256

    def __init__(self, client: Any, tracking_uri: str) -> None:
        self._client = client
        self._tracking_uri = tracking_uri
        self._repos: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _repo(self, run_id: str) -> Any:
        with self._lock:
            repo = self._repos.get(run_id)
            if repo is not None:
                self._repos.move_to_end(run_id)
                return repo
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        artifact_uri = self._client.get_run(run_id).info.artifact_uri
        repo = get_artifact_repository(artifact_uri, tracking_uri=self._tracking_uri)
        with self._lock:
            self._repos[run_id] = repo
            while len(self._repos) > self._MAX_REPOS:
                self._repos.popitem(last=False)
        return repo

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """A file, or a directory's files, under ``artifact_path`` of the run's artifacts."""
        repo = self._repo(run_id)
        if os.path.isdir(local_path):
            repo.log_artifacts(local_path, artifact_path)
        else:
            repo.log_artifact(local_path, artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (or YAML for a ``.yaml``/``.yml`` name, as MLflow's ``log_dict``) at ``artifact_file``."""
        directory, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory(prefix="roma-otel-") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w", encoding="utf-8") as f:
                if name.endswith((".yaml", ".yml")):
                    import yaml

                    yaml.safe_dump(obj, f, default_flow_style=False)
                else:
                    json.dump(obj, f, indent=2)
            self.log_artifact(run_id, path, directory or None)


def known_clash(exc: BaseException) -> str | None:
    """How to fix an MLflow failure that is a known clash between installed versions, else None.

    Such a failure does not heal with retries, so the bridge gives the job up at once and says this.
    """
    if isinstance(exc, ImportError) and "FallbackAsyncAdaptedQueuePool" in str(exc):
        # MLflow 3.6-3.8's SQL store imports a pool class SQLAlchemy 2.1 removed (measured: 3.8.1 fails, 3.9.0 works).
        return "MLflow 3.6-3.8's local store needs SQLAlchemy < 2.1: pip install 'SQLAlchemy<2.1', or MLflow >= 3.9"
    return None

"""roma_otel.compat.mlflow: each branch for MLflow 3.6 to the newest, whichever MLflow the cell installs.

The installed MLflow takes one branch for real (tests/test_mlflow.py runs it end to end); the other branch
runs here on a client or span class shaped like the other versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities.span import Span
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from roma_otel.compat import mlflow as mlflow_compat


def _two_traces() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "compat-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for name in ("a", "b"):
        with tracer.start_as_current_span(name), tracer.start_as_current_span(name + ".child"):
            pass
    return encode_spans(exporter.get_finished_spans())


@pytest.mark.parametrize("takes_resource", [True, False])
def test_spans_convert_with_or_without_the_resource_argument(
    monkeypatch: pytest.MonkeyPatch, takes_resource: bool
) -> None:
    calls: list[dict[str, Any]] = []
    original = Span.from_otel_proto

    if takes_resource:

        def shaped(proto: Any, location_id: Any = None, *, resource: Any = None) -> Any:
            calls.append({"resource": resource})
            return original(proto)
    else:

        def shaped(proto: Any, location_id: Any = None) -> Any:  # type: ignore[misc]  # MLflow 3.6's signature
            calls.append({})
            return original(proto)

    monkeypatch.setattr(Span, "from_otel_proto", staticmethod(shaped))
    mlflow_compat._proto_takes_resource.cache_clear()
    try:
        spans = mlflow_compat.spans_from_request(_two_traces())
    finally:
        mlflow_compat._proto_takes_resource.cache_clear()
    assert sorted(s.name for s in spans) == ["a", "a.child", "b", "b.child"]
    if takes_resource:
        assert all(c["resource"] is not None for c in calls)
        assert {a.value.string_value for c in calls for a in c["resource"].attributes if a.key == "service.name"} == {
            "compat-test"
        }
    else:
        assert calls == [{}] * 4


def test_spans_of_several_traces_are_logged_one_trace_per_call() -> None:
    logged: list[tuple[str, list[str]]] = []
    client = SimpleNamespace(log_spans=lambda location, spans: logged.append((location, [s.name for s in spans])))
    spans = mlflow_compat.spans_from_request(_two_traces())
    mlflow_compat.log_spans_per_trace(client, "7", spans)
    assert [(loc, sorted(names)) for loc, names in logged] == [("7", ["a", "a.child"]), ("7", ["b", "b.child"])]


def test_trace_info_before_spans_keeps_what_mlflow_derives_from_them(tmp_path: Path) -> None:
    """start_trace first, then the spans: the metadata and tags stay, and MLflow still sums the usage."""
    from mlflow.tracing.client import TracingClient
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    uri = f"sqlite:///{tmp_path / 't.db'}"
    client = TracingClient(uri)
    experiment_id = MlflowClient(uri).create_experiment("start-first")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        usage = {"gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 3, "gen_ai.operation.name": "chat"}
        tracer.start_span("chat m", attributes=usage).end()
    trace_id = "tr-" + format(root.get_span_context().trace_id, "032x")
    spans = exporter.get_finished_spans()
    mlflow_compat.start_trace(
        client, trace_id, experiment_id, request_time_ms=spans[-1].start_time // 1_000_000, duration_ms=5, ok=True,
        metadata={"mlflow.sourceRun": "run-1", "mlflow.trace.session": "s-1", "mlflow.trace.user": "u-1"},
        tags={"mlflow.traceName": "named", "execution_id": "e-1"},
    )  # fmt: skip
    mlflow_compat.log_spans_per_trace(client, experiment_id, mlflow_compat.spans_from_request(encode_spans(spans)))
    info = client.get_trace(trace_id).info
    assert info.tags["mlflow.traceName"] == "named" and info.tags["execution_id"] == "e-1"
    meta = info.trace_metadata
    assert [meta[f"mlflow.{k}"] for k in ("sourceRun", "trace.session", "trace.user")] == ["run-1", "s-1", "u-1"]
    usage_meta = json.loads(meta["mlflow.trace.tokenUsage"])
    assert (usage_meta["input_tokens"], usage_meta["output_tokens"], usage_meta["total_tokens"]) == (7, 3, 10)
    assert len(client.get_trace(trace_id).data.spans) == 2


def test_artifacts_are_written_through_the_clients_own_tracking_uri(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("artifacts", artifact_location=str(tmp_path / "store"))
    run_id = client.create_run(experiment_id).info.run_id
    writer = mlflow_compat.ArtifactWriter(client, uri)
    writer.log_dict(run_id, {"answer": "Paris", "n": [1, 2]}, "nested/result.json")
    writer.log_dict(run_id, {"k": "v"}, "top.yaml")
    local = tmp_path / "plain.txt"
    local.write_text("hello")
    writer.log_artifact(run_id, str(local), "files")
    listed = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "nested")}
    assert {"nested/result.json", "top.yaml", "files"} <= listed
    path = client.download_artifacts(run_id, "nested/result.json", str(tmp_path / "dl"))
    assert json.loads(Path(path).read_text()) == {"answer": "Paris", "n": [1, 2]}
    assert Path(client.download_artifacts(run_id, "files/plain.txt", str(tmp_path / "dl"))).read_text() == "hello"


def test_a_known_version_clash_is_named_and_not_retried() -> None:
    from roma_otel.mlflow.bridge import _transient

    clash = ImportError("cannot import name 'FallbackAsyncAdaptedQueuePool' from 'sqlalchemy.pool'")
    fix = mlflow_compat.known_clash(clash)
    assert fix is not None and "SQLAlchemy<2.1" in fix and "MLflow >= 3.9" in fix
    assert _transient(clash) is False  # retrying cannot help: the job is given up and the fix logged
    assert mlflow_compat.known_clash(ImportError("no module named boto3")) is None
    assert _transient(ConnectionError("refused")) is True

"""Forward each execution's spans to MLflow as one trace, linked to the execution's run.

A span processor gathers roma-otel's spans per execution; the bridge's worker sends them over OTLP/HTTP to a
tracking server (``/v1/traces`` + ``x-mlflow-experiment-id``) or through MLflow's store API to a local store.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from roma_otel import semconv as sc
from roma_otel.compat import mlflow as mlflow_compat
from roma_otel.context import ExecutionContext
from roma_otel.mlflow import view
from roma_otel.mlflow.groups import COMPILE, current_scope
from roma_otel.telemetry import ROOT_EXECUTION_KEY, SCOPE

__all__ = [
    "MLflowSpanForwarder",
    "OtlpTraceSink",
    "StoreTraceSink",
    "TraceJob",
    "mlflow_trace_id",
    "prepare_spans",
    "trace_tags",
]

EXPERIMENT_HEADER = "x-mlflow-experiment-id"


def mlflow_trace_id(otel_trace_id: int) -> str:
    """MLflow's id for the trace of an OTel trace id (``tr-`` + 32 hex digits)."""
    return "tr-" + trace_api.format_trace_id(otel_trace_id)


class _Open:
    """An execution whose root span has not ended yet, and the spans gathered for it so far."""

    __slots__ = ("closed", "ctx", "key", "root_id", "spans", "truncated")

    def __init__(self, key: tuple[str, str], root_id: int, ctx: ExecutionContext) -> None:
        self.key = key
        self.root_id = root_id
        self.ctx = ctx
        self.spans: list[tuple[ReadableSpan, int | None]] = []  # (span, id of its nearest forwarded ancestor)
        self.closed = False
        self.truncated = 0


@dataclass
class TraceJob:
    """The finished spans of one execution; ``key`` names the run the trace is linked to."""

    key: tuple[str, str]
    execution_id: str
    spans: list[tuple[ReadableSpan, int | None]]
    truncated: int = 0
    ctx: ExecutionContext | None = None  # the finished execution (its goal, output, metadata)
    capture: bool = False  # content capture was on: the trace may be named after its goal
    sent: bool = False
    started: bool = False  # its trace info (tags, metadata) is written (compat.mlflow.start_trace)
    attempts: int = 0

    @property
    def trace_id(self) -> str:
        return mlflow_trace_id(self.spans[-1][0].context.trace_id)


def _starting_root(span: Any, parent_context: Any) -> ExecutionContext | None:
    """The execution whose root ``span`` is, when ``on_start`` sees an execution's root; else None.

    roma-otel's spans start without attributes (see ``Telemetry.start_span``). A root starts in a context
    that carries its execution (``ROOT_EXECUTION_KEY``: the bridge turns this on), which also reaches
    an ``on_start`` run on another thread (the SDK's ConcurrentMultiSpanProcessor); failing that, the
    root is the span that starts while the current execution has not started its root yet.
    """
    scope = span.instrumentation_scope
    if scope is None or scope.name != SCOPE:
        return None
    if parent_context is not None:
        marked = otel_context.get_value(ROOT_EXECUTION_KEY, parent_context)
        if marked is not None:
            return marked
    ctx = ExecutionContext.get()
    return ctx if ctx is not None and not ctx.root_started else None


class MLflowSpanForwarder(SpanProcessor):
    """Gathers roma-otel's spans per execution and submits each finished execution's trace.

    Only spans inside an execution and made by roma-otel are forwarded (a user's or another
    instrumentation's spans are skipped, and their roma-otel children re-parented to the nearest
    forwarded ancestor). Executions inside a DSPy ``compile`` are skipped unless ``from_compile``.
    """

    def __init__(
        self,
        submit: Callable[[TraceJob], None],
        *,
        from_compile: bool = False,
        capture: bool = False,
        max_spans_per_trace: int = 5000,
        max_open_spans: int = 200_000,
    ) -> None:
        self._submit = submit
        self.from_compile = from_compile
        self.capture = capture
        self.max_spans_per_trace = max_spans_per_trace
        self.max_open_spans = max_open_spans
        # span id -> (its execution, made by roma-otel, id of its nearest roma-otel ancestor)
        self._tracked: dict[int, tuple[_Open, bool, int | None]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self._closed:
            return
        try:
            parent = span.parent
            info = self._tracked.get(parent.span_id) if parent is not None else None
            span_id = span.context.span_id
            if info is None:
                execution = _starting_root(span, parent_context)
                if execution is None:
                    return
                scope = current_scope(parent_context)
                if scope is not None and scope.kind == COMPILE and not self.from_compile:
                    return
                key = scope.key if scope is not None else ("execution", execution.execution_id)
                self._track(span_id, (_Open(key, span_id, execution), True, None))
                return
            owner, parent_is_ours, parent_anchor = info
            ours = span.instrumentation_scope is not None and span.instrumentation_scope.name == SCOPE
            self._track(span_id, (owner, ours, parent.span_id if parent_is_ours else parent_anchor))
        except Exception:  # a forwarding problem must never reach the program
            pass

    def _track(self, span_id: int, info: tuple[_Open, bool, int | None]) -> None:
        if len(self._tracked) >= self.max_open_spans:
            with self._lock:  # spans that never ended (leaked); forget the oldest half
                for stale in list(self._tracked)[: self.max_open_spans // 2]:
                    self._tracked.pop(stale, None)
        self._tracked[span_id] = info

    def on_end(self, span: ReadableSpan) -> None:
        try:
            info = self._tracked.pop(span.context.span_id, None)  # type: ignore[union-attr]
            if info is None:
                return
            owner, ours, anchor = info
            if not ours or owner.closed:
                return
            if span.context.span_id == owner.root_id:  # type: ignore[union-attr]
                owner.closed = True
                owner.spans.append((span, None))
                if not self._closed:
                    ctx = owner.ctx
                    # An execution's run is keyed by its final id: ROMA's own, when a solver adopted it
                    # after the root started (instrumentation/roma.py).
                    key = ("execution", ctx.execution_id) if owner.key[0] == "execution" else owner.key
                    self._submit(TraceJob(key, ctx.execution_id, owner.spans, owner.truncated, ctx, self.capture))
            elif len(owner.spans) < self.max_spans_per_trace:
                owner.spans.append((span, anchor))
            else:
                owner.truncated += 1
        except Exception:
            pass

    def shutdown(self) -> None:
        self._closed = True
        self._tracked.clear()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def trace_tags(job: TraceJob, run_id: str | None = None) -> dict[str, str]:
    """The MLflow trace tags of a job's trace (written with its trace info, before its spans)."""
    root = job.spans[-1][0]
    tags = view.trace_tags_from(job.ctx)
    tags.update({
        sc.MLFLOW_TRACE_NAME: view.trace_name(job.ctx, root.name, job.capture),
        "execution_id": job.execution_id,
        "roma_otel.kind": job.key[0],
    })  # fmt: skip
    if run_id is not None:
        tags["mlflow_run_id"] = run_id
    if job.truncated:
        tags["roma_otel.truncated_spans"] = str(job.truncated)
    return tags


def prepare_spans(job: TraceJob, *, with_cost: bool = False) -> list[ReadableSpan]:
    """The job's spans as MLflow should get them: the root has no parent and carries a request and a
    response, every span its MLflow type, LM spans roma-otel's cost (see ``view``)."""
    out: list[ReadableSpan] = []
    for span, anchor in job.spans:
        ctx = span.context
        assert ctx is not None
        attrs = span.attributes or {}
        if anchor is None:  # the execution's root
            out.append(_copy(span, None, {**attrs, **view.root_view(job.ctx, attrs)}))
            continue
        extra = {}
        if sc.MLFLOW_SPAN_TYPE not in attrs:
            kind = view.span_type(span.name, attrs)
            if kind is not None:
                extra[sc.MLFLOW_SPAN_TYPE] = kind
                if kind in (sc.MLFLOW_TYPE_CHAT_MODEL, sc.MLFLOW_TYPE_LLM):
                    extra.update(view.lm_view(attrs, with_cost=with_cost))
        reparent = span.parent is None or span.parent.span_id != anchor
        if reparent or extra:
            parent = trace_api.SpanContext(ctx.trace_id, anchor, is_remote=False) if reparent else span.parent
            out.append(_copy(span, parent, {**attrs, **extra} if extra else attrs))
        else:
            out.append(span)
    return out


def _copy(span: ReadableSpan, parent: trace_api.SpanContext | None, attributes: Any) -> ReadableSpan:
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=parent,
        resource=span.resource,
        attributes=attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class TraceSendError(RuntimeError):
    """MLflow did not take a batch of spans; the bridge retries it."""


def _auth_headers() -> dict[str, str]:
    """MLflow's client credentials from the environment, for the OTLP request (the REST client adds its own)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


class OtlpTraceSink:
    """Sends spans to a tracking server's OTLP/HTTP endpoint. The endpoint and headers are explicit, so
    ``OTEL_EXPORTER_OTLP_*`` variables meant for other backends never redirect them.

    The server's version is unknown here, so LM spans always carry roma-otel's cost as MLflow's (a server
    without per-span cost keeps it as a plain attribute; one with it shows it instead of pricing the call
    itself, which also spares it loading LiteLLM's price map, seconds on its first request).
    """

    with_cost = True

    def __init__(self, tracking_uri: str, experiment_id: str, *, timeout: float = 30.0) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self.endpoint = tracking_uri.rstrip("/") + "/v1/traces"
        self._exporter = OTLPSpanExporter(
            endpoint=self.endpoint, headers={EXPERIMENT_HEADER: experiment_id, **_auth_headers()}, timeout=timeout
        )

    def send(self, spans: Sequence[ReadableSpan]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self._exporter.export(spans) is not SpanExportResult.SUCCESS:
            raise TraceSendError(f"OTLP export to {self.endpoint} failed")

    def close(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:
            pass


class StoreTraceSink:
    """Writes spans into a local (SQL) tracking store through MLflow's store API (the installed MLflow is
    the store, so cost is sent only where it has per-span cost)."""

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        from mlflow.tracing.client import TracingClient

        self._client = TracingClient(tracking_uri)
        self.experiment_id = experiment_id
        self.with_cost = mlflow_compat.traces_have_cost()

    def send(self, spans: Sequence[ReadableSpan]) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        converted = mlflow_compat.spans_from_request(encode_spans(spans))
        mlflow_compat.log_spans_per_trace(self._client, self.experiment_id, converted)

    def close(self) -> None:
        return None

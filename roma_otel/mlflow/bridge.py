"""The MLflow bridge: one run per finished execution (and per compile/evaluate), written off the hot path.

Producers only append to a bounded queue; a daemon worker does all MLflow I/O in order, retries with backoff
while MLflow is away, counts what it drops (one warning), and flushes within a bound at shutdown or exit.
"""

from __future__ import annotations

import atexit
import collections
import importlib.util
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.trace import StatusCode

from roma_otel import semconv as sc
from roma_otel.compat import mlflow as mlflow_compat
from roma_otel.compat.otel import suppressed_context
from roma_otel.mlflow import view
from roma_otel.mlflow.groups import current_scope
from roma_otel.mlflow.manager import MLflowManager, is_http_uri
from roma_otel.mlflow.runs import RunRecord, execution_run
from roma_otel.mlflow.traces import (
    MLflowSpanForwarder,
    OtlpTraceSink,
    StoreTraceSink,
    TraceJob,
    prepare_spans,
    trace_tags,
)

if TYPE_CHECKING:
    from roma_otel.config import MLflowConfig, RomaOtelConfig
    from roma_otel.context import ExecutionContext
    from roma_otel.instrumentation.patching import Patcher
    from roma_otel.telemetry import Telemetry

__all__ = ["MLflowBridge", "start_bridge"]

logger = logging.getLogger("roma_otel")

DEFAULT_FLUSH_TIMEOUT = 10.0
_MAX_KNOWN = 10_000  # remembered run ids / unlinked trace ids, per key
_MAX_TRACES_PER_SEND = 64
_MAX_LINKS_PER_REQUEST = 100  # MLflow's limit for link_traces_to_run


@dataclass
class _RunJob:
    """A run to write; progress is kept so a retry resumes where the last attempt stopped."""

    ctx: ExecutionContext | None = None
    fallback_name: str = "execution"
    record: RunRecord | None = None
    run_id: str | None = None
    batches_done: int = 0
    artifacts_done: int = 0
    attempts: int = 0


class _Unreachable(Exception):
    """The tracking server does not answer; retry later without spending an attempt."""


class MLflowBridge:
    """Writes runs and traces to MLflow from a background thread. Thread-safe; never blocks the caller."""

    def __init__(
        self,
        config: MLflowConfig,
        *,
        on_drop: Callable[[int, str], None] | None = None,
        persist_tools: bool = False,
        capture: bool = False,
        max_queue: int = 2000,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_attempts: int = 8,
        probe_timeout: float = 2.0,
    ) -> None:
        self.config = config
        self.manager = MLflowManager(config)
        self.tracking_uri = self.manager.tracking_uri
        self.persist_tools = persist_tools
        self.max_queue = max_queue
        self.flush_timeout = flush_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.probe_timeout = probe_timeout
        self._on_drop = on_drop
        self.forwarder = MLflowSpanForwarder(
            self._submit_trace, from_compile=config.log_traces_from_compile, capture=capture
        )
        self.runs_written = 0
        self.traces_written = 0
        self.dropped_runs = 0
        self.dropped_traces = 0
        self._drop_logged = False
        self._down_logged = False
        self._runs: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._unlinked: collections.OrderedDict[tuple[str, str], list[str]] = collections.OrderedDict()
        self._sink: Any = None
        self._tracing: Any = None  # MLflow's TracingClient, made on first use
        self._healthy = not is_http_uri(self.tracking_uri)
        self._backoff = 0.0
        self._retry_at = 0.0
        self._started = False
        self._closed = False
        self._init_threading()

    def _init_threading(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._queue: collections.deque[_RunJob | TraceJob] = collections.deque()
        self._busy = False
        self._in_flight = 0  # jobs of the batch the worker is writing now
        self._stop = False
        self._worker: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._started and not self._closed

    @property
    def log_compiles(self) -> bool:
        return self.config.log_compiles

    @property
    def log_evals(self) -> bool:
        return self.config.log_evals

    def start(self) -> MLflowBridge:
        if not self._started:
            self._started = True
            self._start_worker()
            atexit.register(self.shutdown)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._after_fork)
        return self

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run, name="roma-otel-mlflow", daemon=True)
        self._worker.start()

    def _after_fork(self) -> None:
        # The child starts empty: the parent writes what it had queued.
        self._init_threading()
        if self._started and not self._closed:
            self._start_worker()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or given up); True when done in time."""
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        self._retry_at = 0.0  # a flush is a good moment to try MLflow again
        self._wake.set()
        with self._idle:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._worker is None or not self._worker.is_alive():
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Flush within ``timeout`` (default ``flush_timeout``), then stop.

        A send still in flight when the time is up is not counted as dropped: MLflow may yet store it
        (a tracking server's first trace request can take seconds); it is logged as unconfirmed. What
        never reached MLflow is counted as dropped; a trace whose spans MLflow took is stored, not dropped.
        """
        if self._closed:
            return
        self.forwarder.shutdown()
        if self._started:
            self.flush(timeout)
        self._closed = True
        self._stop = True
        self._wake.set()
        if self._worker is not None:
            self._worker.join(0.5)
        in_flight = self._in_flight if self._worker is not None and self._worker.is_alive() else 0
        with self._lock:
            leftover = list(self._queue)
            self._queue.clear()
        if in_flight:
            logger.warning(
                "roma-otel: %d MLflow %s still being sent to %s when the flush timeout ran out; it may yet "
                "be stored (raise ROMA_OTEL_MLFLOW_FLUSH_TIMEOUT to wait longer)",
                in_flight,
                "write was" if in_flight == 1 else "writes were",
                self.tracking_uri,
            )
        # A job the worker has sent but not yet taken off the queue (between the two) is stored: skip it.
        pending = leftover[in_flight:]
        runs = sum(1 for job in pending if isinstance(job, _RunJob))
        traces = sum(1 for job in pending if isinstance(job, TraceJob) and not job.sent)
        if runs:
            self._drop(runs, "shutdown")
        if traces:
            self._drop(traces, "shutdown", traces=True)
        if self._sink is not None:
            self._sink.close()
        try:
            atexit.unregister(self.shutdown)
        except Exception:
            pass

    # --- producers (application threads) -----------------------------------------------------------------
    def on_execution(self, ctx: ExecutionContext) -> None:
        """The execution listener: queue the finished execution (its run is built by the worker)."""
        scope = current_scope()
        if scope is not None:  # a program call inside compile/evaluate: part of that run
            scope.add_execution(ctx.total_cost, ctx.total_tokens)
            return
        self._submit(_RunJob(ctx=ctx, fallback_name=_root_module_name() if ctx.implicit else "execution"))

    def submit_run(self, record: RunRecord) -> None:
        """Queue a run built elsewhere (compile, evaluate)."""
        self._submit(_RunJob(record=record))

    def _submit_trace(self, job: TraceJob) -> None:
        self._submit(job)

    def _submit(self, job: _RunJob | TraceJob) -> None:
        traces = isinstance(job, TraceJob)
        if self._closed:
            self._drop(1, "closed", traces=traces)
            return
        with self._lock:
            full = len(self._queue) >= self.max_queue
            if not full:
                self._queue.append(job)
        if full:
            self._drop(1, "queue_full", traces=traces)
        else:
            self._wake.set()

    # --- accounting -------------------------------------------------------------------------------------
    def _drop(self, n: int, reason: str, *, traces: bool = False, cause: BaseException | None = None) -> None:
        reason = f"trace_{reason}" if traces else reason
        if traces:
            self.dropped_traces += n
        else:
            self.dropped_runs += n
        if self._on_drop is not None:
            try:
                self._on_drop(n, reason)
            except Exception:
                pass
        if not self._drop_logged:
            self._drop_logged = True
            logger.warning(
                "roma-otel: dropped %d MLflow %s (%s) for %s%s; further drops are only counted "
                '(roma_otel_persistence_dropped{bridge="mlflow"})',
                n,
                "traces" if traces else "runs",
                reason,
                self.tracking_uri,
                f": {cause!r}" if cause is not None else "",
            )
            fix = mlflow_compat.known_clash(cause) if cause is not None else None
            if fix is not None:
                logger.warning("roma-otel: %s", fix)

    # --- worker -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        # The worker's own HTTP and database calls must never be traced back into the program's telemetry.
        otel_context.attach(suppressed_context())
        while not self._stop:
            wait = self._retry_at - time.monotonic() if self._retry_at else None
            if not self._queue or (wait is not None and wait > 0):
                self._wake.wait(wait if wait is not None and wait > 0 else 1.0)
                self._wake.clear()
                continue
            try:
                self._drain()
            except Exception as exc:  # never let the worker die
                logger.warning("roma-otel: MLflow bridge error: %r", exc, exc_info=exc)
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def _drain(self) -> None:
        while self._queue and not self._stop:
            if self._retry_at and time.monotonic() < self._retry_at:
                return
            with self._lock:
                head = self._queue[0]
                batch = [head]
                if isinstance(head, TraceJob):
                    for job in list(self._queue)[1:_MAX_TRACES_PER_SEND]:
                        if not isinstance(job, TraceJob):
                            break
                        batch.append(job)
            with self._idle:
                self._busy = True
            self._in_flight = len(batch)
            try:
                self._connect()
                if isinstance(head, _RunJob):
                    self._write_run(head)
                else:
                    self._write_traces(batch)  # type: ignore[arg-type]
            except Exception as exc:
                if not self._retry(batch, exc):
                    self._pop(len(batch))
                return
            finally:
                self._in_flight = 0
            self._pop(len(batch))
            self._recovered()

    def _pop(self, n: int) -> None:
        with self._lock:
            for _ in range(min(n, len(self._queue))):
                self._queue.popleft()

    def _retry(self, batch: list[Any], exc: Exception) -> bool:
        """Schedule a retry after ``exc``; False when the jobs are given up (and counted)."""
        retriable = isinstance(exc, _Unreachable) or _transient(exc)
        if isinstance(exc, _Unreachable):
            self._healthy = False
        else:  # MLflow answered (or the local store failed): this costs the job an attempt
            batch[0].attempts += 1
        if not retriable or batch[0].attempts >= self.max_attempts:
            traces = isinstance(batch[0], TraceJob)
            logger.debug("roma-otel: MLflow did not take a %s, giving up", "trace" if traces else "run", exc_info=exc)
            self._drop(len(batch), "error" if retriable else "rejected", traces=traces, cause=exc)
            return False
        self._backoff = min(self.max_backoff, self._backoff * 2 or self.min_backoff)
        self._retry_at = time.monotonic() + self._backoff
        if is_http_uri(self.tracking_uri):
            self._healthy = False
        if not self._down_logged:
            self._down_logged = True
            logger.warning(
                "roma-otel: MLflow at %s is unavailable (%s); runs are queued and retried (next in %.1fs)",
                self.tracking_uri,
                exc,
                self._backoff,
            )
        return True

    def _recovered(self) -> None:
        if self._down_logged:
            logger.info("roma-otel: MLflow at %s is reachable again", self.tracking_uri)
        self._down_logged = False
        self._backoff = 0.0
        self._retry_at = 0.0

    def _connect(self) -> None:
        if not self._healthy:
            if not _reachable(self.tracking_uri, self.probe_timeout):
                raise _Unreachable(f"no answer from {self.tracking_uri}")
            self._healthy = True
        self.manager.connect()

    # --- writing ----------------------------------------------------------------------------------------
    def _write_run(self, job: _RunJob) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if job.record is None:
            assert job.ctx is not None
            job.record = execution_run(job.ctx, fallback_name=job.fallback_name, persist_tools=self.persist_tools)
            job.ctx = None
        record = job.record
        client, experiment_id = self.manager.client, self.manager.experiment_id
        if job.run_id is None:
            run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.run_name)
            job.run_id = run.info.run_id
        batches = record.batches()
        while job.batches_done < len(batches):
            metrics, params, tags = batches[job.batches_done]
            client.log_batch(
                job.run_id,
                metrics=[Metric(k, v, record.end_ms, 0) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            job.batches_done += 1
        artifacts = list(record.artifacts.items())
        while job.artifacts_done < len(artifacts):
            path, obj = artifacts[job.artifacts_done]
            self.manager.artifacts.log_dict(job.run_id, obj, path)
            job.artifacts_done += 1
        _terminate(client, job.run_id, record.status, record.end_ms)
        self.runs_written += 1
        self._remember_run(record.key, job.run_id)

    def _remember_run(self, key: tuple[str, str], run_id: str) -> None:
        self._runs[key] = run_id
        while len(self._runs) > _MAX_KNOWN:
            self._runs.popitem(last=False)
        pending = self._unlinked.pop(key, None)
        if pending:
            self._link(pending, run_id)

    def _link(self, trace_ids: list[str], run_id: str) -> None:
        for i in range(0, len(trace_ids), _MAX_LINKS_PER_REQUEST):
            self.manager.client.link_traces_to_run(trace_ids[i : i + _MAX_LINKS_PER_REQUEST], run_id)

    def _trace_sink(self) -> Any:
        if self._sink is None:
            experiment_id = self.manager.experiment_id
            assert experiment_id is not None
            if is_http_uri(self.tracking_uri):
                self._sink = OtlpTraceSink(self.tracking_uri, experiment_id)
            else:
                self._sink = StoreTraceSink(self.tracking_uri, experiment_id)
        return self._sink

    def _tracing_client(self) -> Any:
        if self._tracing is None:
            from mlflow.tracing.client import TracingClient

            self._tracing = TracingClient(self.tracking_uri)
        return self._tracing

    def _write_traces(self, jobs: list[TraceJob]) -> None:
        unsent = [job for job in jobs if not job.sent]
        if not unsent:
            return
        experiment_id = self.manager.experiment_id
        assert experiment_id is not None
        for job in unsent:  # a retry resumes after the traces already started
            if not job.started:
                self._start_trace(job, experiment_id)
                job.started = True
        sink = self._trace_sink()
        spans = [s for job in unsent for s in prepare_spans(job, with_cost=sink.with_cost)]
        sink.send(spans)
        for job in unsent:
            job.sent = True
        self.traces_written += len(unsent)

    def _start_trace(self, job: TraceJob, experiment_id: str) -> None:
        """The trace's info, before its spans: its tags, and as metadata its run, session and user."""
        root = job.spans[-1][0]
        run_id = self._runs.get(job.key)
        metadata: dict[str, str] = {}
        if run_id is not None:
            metadata[sc.MLFLOW_SOURCE_RUN] = run_id
        else:  # its run is not written yet (or was dropped): link it when it is
            self._unlinked.setdefault(job.key, []).append(job.trace_id)
            while len(self._unlinked) > _MAX_KNOWN:
                self._unlinked.popitem(last=False)
        session, user = view.session_and_user(job.ctx)
        if session is not None:
            metadata[sc.MLFLOW_TRACE_SESSION] = session
        if user is not None:
            metadata[sc.MLFLOW_TRACE_USER] = user
        start_ns, end_ns = root.start_time or 0, root.end_time or root.start_time or 0
        mlflow_compat.start_trace(
            self._tracing_client(),
            job.trace_id,
            experiment_id,
            request_time_ms=start_ns // 1_000_000,
            duration_ms=max(0, end_ns - start_ns) // 1_000_000,
            ok=root.status.status_code is not StatusCode.ERROR,
            metadata=metadata,
            tags=trace_tags(job, run_id),
        )


def _terminate(client: Any, run_id: str, status: str, end_ms: int) -> None:
    """End a run through the store: ``set_terminated`` would also print the run's URL on the program's stdout."""
    from mlflow.entities import RunStatus

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is None or not hasattr(store, "update_run_info"):
        client.set_terminated(run_id, status, end_time=end_ms)
        return
    store.update_run_info(run_id, run_status=RunStatus.from_string(status), end_time=end_ms, run_name=None)


def _transient(exc: BaseException) -> bool:
    """True for failures worth retrying: unreachable server, 5xx/429, a locked database."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return mlflow_compat.known_clash(exc) is None


def _reachable(uri: str, timeout: float) -> bool:
    """A tracking server answers (any HTTP status below 500 counts: auth or routing is not our concern)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except Exception:
        return False


def _root_module_name() -> str:
    """The class of the outermost module call that made an implicit execution (its run name)."""
    from roma_otel.instrumentation.modules import current_module_instance

    instance = current_module_instance()
    return type(instance).__name__ if instance is not None else "execution"


def start_bridge(config: RomaOtelConfig, tel: Telemetry, tracer_provider: Any, patcher: Patcher) -> MLflowBridge | None:
    """Start the bridge when ``observability.mlflow.enabled``: listener, span forwarder, optimizer hooks."""
    ml = config.observability.mlflow
    if not ml.enabled:
        return None
    if importlib.util.find_spec("mlflow") is None:
        logger.warning("roma-otel: observability.mlflow.enabled needs MLflow: pip install 'roma-otel[mlflow]'")
        return None
    tm = config.observability.toolkit_metrics
    bridge = MLflowBridge(
        ml,
        on_drop=lambda n, reason: tel.persistence_dropped.add(n, {"bridge": "mlflow", "reason": reason}),
        persist_tools=tm.enabled and tm.persist_to_mlflow,
        capture=config.observability.content_capture.on_spans,
        flush_timeout=ml.flush_timeout,
    )
    if ml.log_traces:
        from opentelemetry import trace

        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if hasattr(provider, "add_span_processor"):
            provider.add_span_processor(bridge.forwarder)
            tel.roots_in_context = True  # the forwarder recognises roots in on_start (see traces.py)
        else:
            logger.warning("roma-otel: observability.mlflow.log_traces needs an SDK TracerProvider; traces are off")
    from roma_otel.instrumentation.optimizers import instrument_optimizers

    instrument_optimizers(patcher, bridge)
    tel.execution_listeners.append(bridge.on_execution)
    return bridge.start()

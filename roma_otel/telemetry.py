"""The tracer, every metric instrument, and the recording helpers the wrappers call.

``RomaInstrumentor`` builds one ``Telemetry`` per ``instrument()`` and publishes it as ``ACTIVE``;
wrappers read ``ACTIVE`` on each call and do nothing when it is None. Instruments are created once
here, from the names in ``semconv``, so a metric's name, unit and buckets exist in exactly one place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from roma_otel import semconv as sc
from roma_otel.compat import otel as otel_compat
from roma_otel.redaction import Redactor
from roma_otel.version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from roma_otel.config import RomaOtelConfig
    from roma_otel.context import ExecutionContext

logger = logging.getLogger("roma_otel")

ACTIVE: Telemetry | None = None

SCOPE = "roma_otel"  # the instrumentation scope of every span and metric roma-otel makes

# Context key under which an execution root's start context carries its ExecutionContext (start_root_span).
ROOT_EXECUTION_KEY = otel_context.create_key("roma_otel.root_execution")


_SUPPRESSION_KEYS = otel_compat.suppression_keys()


def enabled_context() -> otel_context.Context | None:
    """The current context, or None where ``is_instrumentation_enabled()`` is false.

    A wrapper reads the current context once, here, and uses it for ``skip_span`` and the span's start
    too: each ``get_current()`` is three Python calls, and a module call used to make five of them.
    (A Context is a dict: an empty one is false, so test the result against None.)
    """
    current = otel_context.get_current()
    keys = _SUPPRESSION_KEYS
    if keys is None:  # pragma: no cover - depends on the installed opentelemetry
        from opentelemetry.instrumentation.utils import is_instrumentation_enabled

        return current if is_instrumentation_enabled() else None
    return None if current.get(keys[0]) or current.get(keys[1]) else current


_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


class _MeterState:
    """roma-otel's instruments on one meter, shared by every ``instrument()`` that uses that meter.

    Sharing means instrumenting again with the same MeterProvider continues the same counter totals
    and the same histogram queues instead of registering a second callback for a name.
    """

    def __init__(self, meter: Any) -> None:
        self.meter = meter
        self.counters: dict[str, FastCounter] = {}
        self.histograms: dict[str, DeferredHistogram] = {}
        self.execution_ends: DeferredExecutionEnds | None = None

    def counter(self, spec: tuple[str, str, str]) -> FastCounter:
        with _STATES_LOCK:
            found = self.counters.get(spec[0])
            if found is None:
                found = self.counters[spec[0]] = FastCounter(self, spec)
            return found

    def histogram(self, spec: tuple[str, str, str], buckets: tuple[float, ...]) -> DeferredHistogram:
        with _STATES_LOCK:
            found = self.histograms.get(spec[0])
            if found is None:
                found = self.histograms[spec[0]] = DeferredHistogram(self, spec, buckets)
            return found

    def ends(self) -> DeferredExecutionEnds:
        if self.execution_ends is None:
            ends = DeferredExecutionEnds(self)  # outside the lock: it takes it for its own instruments
            with _STATES_LOCK:
                if self.execution_ends is None:
                    self.execution_ends = ends
        return self.execution_ends

    def drain(self) -> None:
        # Execution ends first: they feed a counter and two of the histograms below.
        if self.execution_ends is not None:
            self.execution_ends.drain()
        for histogram in list(self.histograms.values()):
            histogram.drain()


class FastCounter:
    """A monotonic counter summed here and reported through an ObservableCounter.

    An ``add`` is a dict update under a lock (well under a microsecond) instead of the SDK's synchronous
    measurement pipeline (about 4 µs per call on the reference machine); the exporter sees the same
    cumulative sums, names and labels. Its callback also hands the meter's queued histogram values to
    the SDK (see ``DeferredHistogram``), because the SDK runs every callback before it reads aggregations.
    """

    __slots__ = ("__weakref__", "_lock", "_state", "_totals")

    def __init__(self, state: _MeterState, spec: tuple[str, str, str]) -> None:
        self._totals: dict[frozenset[tuple[str, Any]], float] = {}
        self._lock = threading.Lock()
        self._state = state
        state.meter.create_observable_counter(spec[0], callbacks=[self._observe], unit=spec[1], description=spec[2])

    def add(self, amount: float, attributes: dict[str, Any]) -> None:
        self.add_key(amount, frozenset(attributes.items()))

    def add_key(self, amount: float, key: frozenset[tuple[str, Any]]) -> None:
        """``add`` with the attributes already frozen (callers that reuse one label set keep the key)."""
        with self._lock:
            self._totals[key] = self._totals.get(key, 0) + amount

    def _observe(self, options: Any) -> list[metrics.Observation]:
        self._state.drain()
        with self._lock:
            items = list(self._totals.items())
        return [metrics.Observation(value, dict(key)) for key, value in items]


# The exemplar context for a value recorded outside any span: a context whose span is invalid, so the
# SDK neither takes the collecting thread's current span nor samples an exemplar for it.
_NO_SPAN_CONTEXT = trace.set_span_in_context(trace.INVALID_SPAN)


class DeferredHistogram:
    """An SDK histogram whose records wait in a queue until a reader collects.

    A synchronous SDK record costs 5-10 µs in place (a measurement object, the exemplar filter, a copy
    and a recursive hash of the attributes, a lock per reader); appending to a deque costs ~0.2 µs. The
    queue is drained into the real histogram, in order, from roma-otel's observable-counter callbacks,
    which the SDK runs at the start of every collection before it reads any aggregation: each reader
    sees every value exactly once, in the collection interval it was recorded in, with the same names,
    units, buckets and views. The recording thread drains the queue itself once it holds ``limit``
    values, a few per record, so memory stays bounded when nothing collects (or collects rarely, under a
    heavy load) and no single call pays for a long queue.

    Exemplars keep their span: the span context is queued with the value and replayed as the
    measurement's context. Their timestamp is the collection's, not the record's.
    """

    __slots__ = ("__weakref__", "_histogram", "_limit", "_pending")

    LIMIT = 4096
    DRAIN_STEP = 16

    def __init__(self, state: _MeterState, spec: tuple[str, str, str], buckets: tuple[float, ...]) -> None:
        self._histogram = state.meter.create_histogram(
            spec[0], unit=spec[1], description=spec[2], explicit_bucket_boundaries_advisory=list(buckets)
        )
        self._pending: deque[tuple[float, dict[str, Any], SpanContext]] = deque()
        self._limit = self.LIMIT

    def record(self, value: float, attributes: dict[str, Any], span: Span | None = None) -> None:
        """Queue ``value``; ``span`` is the span an exemplar for it may point at (default: the current one)."""
        if span is None:
            span = trace.get_current_span()
        pending = self._pending
        pending.append((value, attributes, span.get_span_context()))
        if len(pending) > self._limit:
            # A few at a time, so no single call pays for thousands of values.
            self.drain(self.DRAIN_STEP)

    def drain(self, most: int | None = None) -> None:
        """Hand queued values to the SDK (all, or at most ``most``), oldest first. Safe from any thread:
        each value is taken exactly once."""
        pending = self._pending
        record = self._histogram.record
        left = most if most is not None else -1
        last_span_context: SpanContext | None = None
        context = _NO_SPAN_CONTEXT
        while left:
            left -= 1
            try:
                value, attributes, span_context = pending.popleft()
            except IndexError:
                return
            # Consecutive values of one call (an LM call queues four) share their span's context.
            if span_context is not last_span_context:
                last_span_context = span_context
                context = exemplar_context(span_context)
            record(value, attributes, context=context)

    def record_now(self, value: float, attributes: dict[str, Any], context: Any) -> None:
        """Record straight into the SDK histogram (for a drain that already holds the exemplar context)."""
        self._histogram.record(value, attributes, context=context)


def exemplar_context(span_context: SpanContext) -> Any:
    """The context a queued value is replayed in, so an exemplar points at the span it was recorded in."""
    if span_context.is_valid:
        return trace.set_span_in_context(NonRecordingSpan(span_context))
    return _NO_SPAN_CONTEXT


# status -> (its label set, the same frozen for FastCounter.add_key): built once, not per execution
_STATUS_LABELS = {
    failed: ({sc.L_STATUS: status}, frozenset({(sc.L_STATUS, status)}))
    for failed, status in ((False, "completed"), (True, "failed"))
}


class DeferredExecutionEnds:
    """Ended executions queued until a reader collects: one append per execution instead of a counter
    add and two histogram records.

    Every outermost module call is an execution, so this is on the hot path of a program that calls
    modules at its top level: the three measurements cost ~3 µs there, the append ~0.2 µs. The drain
    (run, like ``DeferredHistogram``'s, from the meter's callbacks before any aggregation is read, or a
    few at a time by the recording thread once ``LIMIT`` are queued) makes the same measurements, with
    the same labels and the same exemplar span, in order.
    """

    __slots__ = ("__weakref__", "_cost", "_count", "_duration", "_pending")

    LIMIT = DeferredHistogram.LIMIT
    DRAIN_STEP = DeferredHistogram.DRAIN_STEP

    def __init__(self, state: _MeterState) -> None:
        self._count = state.counter(sc.M_EXECUTIONS)
        self._duration = state.histogram(sc.M_EXECUTION_DURATION_SECONDS, sc.EXECUTION_DURATION_SECONDS_BUCKETS)
        self._cost = state.histogram(sc.M_EXECUTION_COST_USD, sc.EXECUTION_COST_USD_BUCKETS)
        self._pending: deque[tuple[bool, float, float, SpanContext]] = deque()

    def record(self, failed: bool, duration_s: float, cost_usd: float, span: Span) -> None:
        """Queue one execution's end; ``span`` is its root (the exemplar for both histograms)."""
        pending = self._pending
        pending.append((failed, duration_s, cost_usd, span.get_span_context()))
        if len(pending) > self.LIMIT:
            self.drain(self.DRAIN_STEP)

    def drain(self, most: int | None = None) -> None:
        pending = self._pending
        left = most if most is not None else -1
        while left:
            left -= 1
            try:
                failed, duration_s, cost_usd, span_context = pending.popleft()
            except IndexError:
                return
            labels, key = _STATUS_LABELS[failed]
            self._count.add_key(1, key)
            context = exemplar_context(span_context)
            self._duration.record_now(duration_s, labels, context)
            self._cost.record_now(cost_usd, labels, context)


_STATES: weakref.WeakKeyDictionary[Any, _MeterState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _meter_state(meter: Any) -> _MeterState:
    with _STATES_LOCK:
        try:
            state = _STATES.get(meter)
            if state is None:
                state = _STATES[meter] = _MeterState(meter)
        except TypeError:  # a meter that cannot be weakly referenced: no sharing
            state = _MeterState(meter)
        return state


def _parent_based(tracer_provider: Any) -> bool:
    """True when children of a sampled-out span are sampled out too, so we may skip making them."""
    sampler = getattr(tracer_provider, "sampler", None)
    if sampler is None:
        return False
    from opentelemetry.sdk.trace.sampling import ParentBased

    return isinstance(sampler, ParentBased)


_attribute_dict = otel_compat.attribute_dict  # the SDK span's attribute dict (used where verified)

# Attribute values roma-otel may write without the SDK's per-value check: they are stored as they are.
_PLAIN_VALUE_TYPES = frozenset({str, bool, int, float})


def _attribute_blind(sampler: Any) -> bool:
    """True for the SDK's own samplers, which decide on the trace id and the parent and never read the
    span's attributes (so those may be set just after the span starts instead of at its start)."""
    if sampler is None:
        return False
    from opentelemetry.sdk.trace import sampling

    if type(sampler).__module__ != sampling.__name__:
        return False
    delegates = [v for v in vars(sampler).values() if isinstance(v, sampling.Sampler)]
    return all(_attribute_blind(d) for d in delegates)


def _event_logger(logger_provider: Any, schema_url: str) -> Any:
    """A Logs API logger for GenAI events (the global provider's unless one is given), or None if the
    installed API cannot emit events (``LogRecord(event_name=...)`` needs API >= 1.35)."""
    try:
        from opentelemetry import _logs

        return _logs.get_logger(SCOPE, __version__, logger_provider, schema_url=schema_url)
    except Exception as exc:  # an API without the Logs API: content then goes nowhere, and we say so
        logger.warning("roma-otel: content_capture.destination needs the OpenTelemetry Logs API: %r", exc)
        return None


def genai_latest_opted_in(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``OTEL_SEMCONV_STABILITY_OPT_IN`` (a comma-separated list) asks for the latest GenAI conventions."""
    raw = (os.environ if environ is None else environ).get(sc.SEMCONV_OPT_IN_ENV, "")
    return sc.GENAI_LATEST_OPT_IN in {part.strip().lower() for part in raw.split(",")}


class Telemetry:
    """Holds the tracer, the instruments and the settings the wrappers need on their hot path."""

    def __init__(
        self,
        config: RomaOtelConfig,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        logger_provider: Any = None,
    ) -> None:
        self.config = config
        self.config_version = config.config_version  # every execution carries it
        # The latest GenAI conventions, opted into (see semconv.GENAI_LATEST_OPT_IN); read once, as upstream does.
        self.genai_latest = genai_latest_opted_in()
        schema_url = sc.GENAI_SEMCONV_SCHEMA_URL if self.genai_latest else _SCHEMA_URL
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider, schema_url=schema_url)
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.parent_based = _parent_based(provider)
        # See start_span/set_attributes: the SDK span class whose attribute dict may be written directly,
        # found on the first recording span (None until then, or for good when it cannot be).
        self._attribute_blind = _attribute_blind(getattr(provider, "sampler", None))
        self._direct_span_type: type | None = None
        self._direct_max_attributes = 0
        self._probed = False
        # Set by a span processor that recognises execution roots in on_start (see start_root_span).
        self.roots_in_context = False
        meter = metrics.get_meter(SCOPE, __version__, meter_provider, schema_url=schema_url)

        tm = config.observability.toolkit_metrics
        self.toolkit_enabled = tm.enabled
        self.track_invocations = tm.enabled and tm.track_invocations
        self.track_lifecycle = tm.enabled and tm.track_lifecycle
        self.sample_rate = tm.sample_rate
        cc = config.observability.content_capture
        self.redactor = Redactor(cc.max_length) if cc.on_spans else None
        # LM content as the GenAI inference event (a log record), when the destination asks for it.
        self.content_events = _event_logger(logger_provider, schema_url) if cc.on_events else None
        self.event_redactor = Redactor(cc.max_length) if cc.on_events else None

        state = _meter_state(meter)
        counter, histogram = state.counter, state.histogram

        self.tool_invocations = counter(sc.M_TOOL_INVOCATIONS)
        self.tool_success = counter(sc.M_TOOL_INVOCATIONS_SUCCESS)
        self.tool_failed = counter(sc.M_TOOL_INVOCATIONS_FAILED)
        self.tool_duration = histogram(sc.M_TOOL_DURATION_MS, sc.TOOL_DURATION_MS_BUCKETS)
        self.lm_calls = counter(sc.M_LM_CALLS)
        self.lm_tokens = counter(sc.M_LM_TOKENS)
        self.lm_cost = counter(sc.M_LM_COST_USD)
        self.lm_cost_unknown = counter(sc.M_LM_COST_UNKNOWN)
        self.lm_latency = histogram(sc.M_LM_LATENCY_MS, sc.LM_LATENCY_MS_BUCKETS)
        self.genai_tokens = histogram(sc.M_GENAI_TOKEN_USAGE, sc.GENAI_TOKEN_USAGE_BUCKETS)
        self.genai_duration = histogram(sc.M_GENAI_OPERATION_DURATION, sc.GENAI_OPERATION_DURATION_BUCKETS)
        # executions by status and the execution duration and cost histograms
        self.execution_ends = state.ends()
        self.tasks = counter(sc.M_TASKS)
        self.toolkit_events = counter(sc.M_TOOLKIT_LIFECYCLE)
        self.toolkit_duration = histogram(sc.M_TOOLKIT_LIFECYCLE_DURATION_MS, sc.TOOL_DURATION_MS_BUCKETS)
        self.internal_errors = counter(sc.M_INSTRUMENTATION_ERRORS)
        self.persistence_dropped = counter(sc.M_PERSISTENCE_DROPPED)
        self._logged_errors: set[str] = set()
        # Bridges (MLflow, Postgres) subscribe here to hear about each finished execution.
        self.execution_listeners: list[Callable[[ExecutionContext], None]] = []

    # --- spans ----------------------------------------------------------------------------------
    def start_span(
        self, name: str, kind: SpanKind, attributes: dict[str, Any], context: otel_context.Context | None = None
    ) -> Span:
        """``tracer.start_span`` for roma-otel's own spans.

        The SDK checks and copies every attribute value given at the start (about 0.4 µs each, and
        roma-otel's spans carry 5 to 20; a sampled span pays it twice, once for the sampler's result).
        When the sampler cannot read attributes, the span starts with none and they are written right
        after through ``set_attributes``, which skips the check for values that need none: a span
        processor's ``on_start`` then sees no attributes (it finds the execution through
        ``ExecutionContext.get()``, see ``ExecutionContext.root_started``). Otherwise everything is
        given at the start. ``context``: the current context, when the caller has already read it.
        """
        if not self._attribute_blind:
            return self.tracer.start_span(name, context, kind=kind, attributes=attributes)
        span = self.tracer.start_span(name, context, kind=kind)
        self.set_attributes(span, attributes)
        return span

    def start_root_span(
        self,
        name: str,
        execution: ExecutionContext,
        current: otel_context.Context,
        build: Callable[..., dict[str, Any]],
        *args: Any,
    ) -> tuple[Span, dict[str, Any] | None]:
        """Start ``execution``'s root span; return it and the attributes still to be written, if any.

        ``build(*args)`` makes the root's start attributes. When the sampler cannot read attributes, the
        span starts without them and they are built only if it records, and returned instead of
        written, for ``finish_execution`` to write with the execution's end figures in one go (one
        write per outermost module call instead of two; nothing reads an SDK span's attributes before
        it ends except the sampler and ``on_start``, which gets none, see ``start_span``). Otherwise
        the sampler gets them at the start. With ``roots_in_context`` set (by a span processor that
        must recognise roots in ``on_start``, possibly on another thread), the context the span starts
        in carries the execution under ``ROOT_EXECUTION_KEY``. ``current``: the current context.
        """
        context = otel_context.set_value(ROOT_EXECUTION_KEY, execution, current) if self.roots_in_context else current
        if not self._attribute_blind:
            span = self.tracer.start_span(name, context, kind=SpanKind.INTERNAL, attributes=build(*args))
            return span, None
        span = self.tracer.start_span(name, context, kind=SpanKind.INTERNAL)
        try:
            return span, build(*args) if span.is_recording() else None
        except BaseException:
            span.end()  # never leave a started span behind
            raise

    def set_attributes(self, span: Span, attributes: dict[str, Any], plain: bool = False) -> None:
        """``span.set_attributes`` for values roma-otel built, on a span roma-otel started and has not ended.

        On the SDK's span, with no attribute-length limit and room under the attribute-count limit,
        values of plain types (str, bool, int, float: stored unchanged by the SDK's check) go straight
        into the span's attribute dict. Anything else takes the public path. ``plain=True``: the caller
        built every value as one of those types itself, so they are not checked again.
        """
        if type(span) is self._direct_span_type:
            stored = _attribute_dict(span)
            if len(stored) + len(attributes) <= self._direct_max_attributes and (
                plain or _PLAIN_VALUE_TYPES.issuperset(map(type, attributes.values()))
            ):
                stored.update(attributes)  # one C call: no other thread's write can fall between
                return
        elif not self._probed and span.is_recording():
            self._probe(span)
            if type(span) is self._direct_span_type:
                self.set_attributes(span, attributes, plain)
                return
        span.set_attributes(attributes)

    def _probe(self, span: Span) -> None:
        """Decide once whether spans of this tracer allow the direct path (see ``set_attributes``)."""
        self._probed = True
        if not otel_compat.paths().attributes:  # the installed SDK's attributes are not as verified
            return
        try:
            from opentelemetry.attributes import BoundedAttributes
            from opentelemetry.sdk.trace import Span as SdkSpan

            bounded = otel_compat.bounded_attributes(span)
            if (
                isinstance(span, SdkSpan)
                and type(bounded) is BoundedAttributes
                and type(otel_compat.attribute_dict(span)) is dict
                and bounded.max_value_len is None
            ):
                self._direct_max_attributes = bounded.maxlen if bounded.maxlen is not None else sys.maxsize
                self._direct_span_type = type(span)
        except Exception:  # an SDK whose span is built differently: keep the public path
            self._direct_span_type = None

    # --- sampling -------------------------------------------------------------------------------
    def sample_tool(self) -> bool:
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def skip_span(self, current: otel_context.Context | None = None) -> bool:
        """True when the current span is sampled out and a parent-based sampler would drop a child.

        Starting a span just to have it dropped costs microseconds per call; skipping it keeps
        sampled-out tracing nearly free while metrics still count every call. ``current``: the current
        context, when the caller has already read it.
        """
        if not self.parent_based:
            return False
        ctx = trace.get_current_span(current).get_span_context()
        return ctx.is_valid and not ctx.trace_flags.sampled

    # --- failures inside roma-otel --------------------------------------------------------------
    def internal_error(self, where: str, exc: BaseException) -> None:
        """Log once per site and count; never raise into the observed program."""
        try:
            self.internal_errors.add(1, {"where": where})
            if where not in self._logged_errors:
                self._logged_errors.add(where)
                logger.warning("roma-otel: internal error in %s (swallowed): %r", where, exc, exc_info=exc)
        except Exception:  # pragma: no cover - logging itself failed
            pass


def mark_error(span: Span | None, exc: BaseException) -> str:
    """Record an exception on a span the way OTel instrumentations do; return its error.type."""
    error_type = type(exc).__qualname__
    if span is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR, str(exc)[:1000]))
        span.record_exception(exc)
        span.set_attribute(sc.ERROR_TYPE, error_type)
    return error_type


def to_json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)

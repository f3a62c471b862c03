"""The OpenTelemetry SDK's private fields behind roma-otel's fast paths, and version-specific SDK API.

roma-otel's hot paths read and write a few of the SDK span's private fields, because the public
properties cost several times more (README, Performance):

- ``span._attributes._dict``: the plain dict inside the SDK's ``BoundedAttributes``, written directly
  by ``Telemetry.set_attributes`` and read by the Postgres writers;
- ``span._instrumentation_scope``: read in the writers' ``on_end`` to keep only roma-otel's spans;
- ``SDK_ROW`` / ``SDK_ROOT_ROW``: one dotted attrgetter over ``_name``, ``_context``, ``_parent``,
  ``_start_time``, ``_end_time``, ``_status._status_code._value_``, ``_status._description`` and
  ``_attributes._dict`` that snapshots a finished span for the writer process.

Each one is taken only after ``probe()`` has checked it against the installed SDK on a real span (at
``instrument()`` time) and found that it gives exactly what the public API gives; otherwise, or with
``ROMA_OTEL_SDK_FAST_PATHS=0``, the public API is used, with identical attributes and rows. The names of
those private fields appear nowhere else in roma-otel.
"""

from __future__ import annotations

import inspect
import logging
import operator
import os
import threading
from dataclasses import dataclass
from typing import Any

from roma_otel.compat import degraded

logger = logging.getLogger("roma_otel")

FAST_PATHS_ENV = "ROMA_OTEL_SDK_FAST_PATHS"  # "0" forces the public-API path everywhere

# The private-field getters (C calls). Used only where probe() allowed them.
attribute_dict = operator.attrgetter("_attributes._dict")
bounded_attributes = operator.attrgetter("_attributes")
scope_field = operator.attrgetter("_instrumentation_scope")
parent_field = operator.attrgetter("_parent")


def bounded_dict(attributes: Any) -> Any:
    """The plain dict inside a ``BoundedAttributes`` (None for any other mapping)."""
    return getattr(attributes, "_dict", None)


def _row_getter(parent: str) -> operator.attrgetter[Any]:
    return operator.attrgetter(
        "_name", "_context.trace_id", "_context.span_id", parent, "_start_time", "_end_time",
        "_status._status_code._value_", "_status._description", "_attributes._dict",
    )  # fmt: skip


SDK_ROW = _row_getter("_parent.span_id")  # a span with a parent
SDK_ROOT_ROW = _row_getter("_parent")  # a root: its _parent is None, which is what the row holds


def public_row(span: Any) -> tuple[Any, ...]:
    """What ``SDK_ROW`` reads, through the public ``ReadableSpan`` API (attributes copied to a dict)."""
    parent = span.parent
    status = span.status
    context = span.context
    attributes = span.attributes
    return (
        span.name, context.trace_id, context.span_id, parent.span_id if parent is not None else None,
        span.start_time, span.end_time, status.status_code.value, status.description,
        attributes if type(attributes) is dict else dict(attributes or {}),
    )  # fmt: skip


def fast_paths_allowed() -> bool:
    return os.environ.get(FAST_PATHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class SdkPaths:
    """Which private fast paths the installed SDK was verified to support."""

    attributes: bool = False  # _attributes is BoundedAttributes over a plain _dict, writable directly
    scope: bool = False  # _instrumentation_scope is what instrumentation_scope returns
    row: bool = False  # SDK_ROW / SDK_ROOT_ROW give public_row()'s values


PUBLIC = SdkPaths()
_PATHS: SdkPaths | None = None
_LOCK = threading.Lock()


def paths() -> SdkPaths:
    """The verified fast paths (probing once per process, and again after ``reset()``)."""
    found = _PATHS
    if found is None:
        with _LOCK:
            found = _PATHS if _PATHS is not None else _set(probe())
    return found


def _set(found: SdkPaths) -> SdkPaths:
    global _PATHS
    _PATHS = found
    return found


def reset() -> None:
    """Forget the probe's answer (tests, and a change of ``ROMA_OTEL_SDK_FAST_PATHS``)."""
    global _PATHS
    _PATHS = None


def probe() -> SdkPaths:
    """Check every fast path on real SDK spans of a private provider; never raises."""
    if not fast_paths_allowed():
        return PUBLIC
    try:
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.sdk.trace import Span as SdkSpan
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import Status, StatusCode, set_span_in_context
    except ImportError as err:
        degraded.report("opentelemetry-sdk", "private fast paths (public API used)", err)
        return PUBLIC
    try:
        tracer = TracerProvider().get_tracer("roma_otel.compat.probe", "0")
        root = tracer.start_span("probe-root", attributes={"a": 1})
        if not isinstance(root, SdkSpan):  # OTEL_SDK_DISABLED (the writer process): no SDK span to read
            root.end()
            return PUBLIC
        child = tracer.start_span("probe-child", set_span_in_context(root), attributes={"b": "x"})
        bounded = bounded_attributes(child)
        attributes = (
            isinstance(child, SdkSpan)
            and type(bounded) is BoundedAttributes
            and type(attribute_dict(child)) is dict
            and hasattr(bounded, "maxlen")
            and getattr(bounded, "max_value_len", None) is None
        )
        if attributes:
            attribute_dict(child)["c"] = 2.5  # a direct write must show through the public mapping
            attributes = dict(child.attributes) == {"b": "x", "c": 2.5}
        scope = scope_field(child) is child.instrumentation_scope
        child.set_status(Status(StatusCode.ERROR, "probe"))
        child.end()
        root.end()
        row = (
            attributes
            and SDK_ROW(child) == public_row(child)
            and SDK_ROOT_ROW(root) == public_row(root)
            and parent_field(root) is None
            and parent_field(child) is not None
        )
    except Exception as err:
        degraded.report("opentelemetry-sdk", "private fast paths (public API used)", err)
        return PUBLIC
    found = SdkPaths(attributes=bool(attributes), scope=bool(scope), row=bool(row))
    if found != SdkPaths(True, True, True):
        missing = [name for name, ok in vars(found).items() if not ok]
        degraded.report("opentelemetry-sdk", f"fast paths {missing} (public API used; same data, slower)", "probe")
    return found


def ended_attributes(span: Any) -> dict[str, Any]:
    """An ended span's attributes as a plain dict (the SDK's own, when verified; else a copy)."""
    if paths().attributes:
        # getattr with a default, not try/except: a SpanRecord (writer process, OTLP receiver) has no
        # _attributes, and a raised AttributeError per span cost the receiver a microsecond each.
        inner = bounded_dict(getattr(span, "_attributes", None))
        if type(inner) is dict:
            return inner
    attrs = span.attributes
    if type(attrs) is dict:  # a SpanRecord from the writer process: already a private plain dict
        return attrs
    return dict(attrs or {})


def scope_getter() -> operator.attrgetter[Any]:
    """Reads a span's instrumentation scope: the field when verified, else the property."""
    return scope_field if paths().scope else operator.attrgetter("instrumentation_scope")


# --- the Prometheus exporter ----------------------------------------------------------------------


def prometheus_reader(registry: Any) -> tuple[Any, Any]:
    """A ``PrometheusMetricReader`` whose series are served from ``registry`` only; and a release
    function to call before the reader's provider shuts down.

    0.63b0 and later take ``registry=``; 0.62b0 and earlier always register into prometheus_client's
    global REGISTRY, so the reader's collector is moved from there to ``registry`` (and put back before
    shutdown, where the reader unregisters it). An exporter that has neither shape serves through the
    global REGISTRY, with a warning.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    try:
        accepts_registry = "registry" in inspect.signature(PrometheusMetricReader.__init__).parameters
    except (TypeError, ValueError):
        accepts_registry = False
    if accepts_registry:
        return PrometheusMetricReader(registry=registry), _nothing
    from prometheus_client import REGISTRY

    reader = PrometheusMetricReader()
    collector = getattr(reader, "_collector", None)
    try:
        _move(collector, REGISTRY, registry)
    except Exception as err:
        degraded.report(
            "opentelemetry-exporter-prometheus",
            "the endpoint's own registry (its series are served from the global REGISTRY)", err,
        )  # fmt: skip
        return reader, _nothing

    def release() -> None:
        try:
            _move(collector, registry, REGISTRY)
        except Exception:  # already moved back, or the registry refused: the reader's shutdown logs it
            pass

    return reader, release


def _move(collector: Any, source: Any, target: Any) -> None:
    """Move the exporter's collector between registries without collecting: ``register`` describes a
    collector by collecting it, and the reader's callback would then warn that it has no MeterProvider
    yet ("Cannot call collect on a MetricReader until it is registered")."""
    callback = getattr(collector, "_callback", None)
    collector._callback = None
    try:
        source.unregister(collector)
        target.register(collector)
    finally:
        collector._callback = callback


def _nothing() -> None:
    return None


# --- instrumentation suppression ------------------------------------------------------------------


def suppressed_context() -> Any:
    """The current context with instrumentation suppressed (for a writer's own thread: its database and
    HTTP calls must not be traced by any instrumentation)."""
    from opentelemetry import context as otel_context
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        return otel_context.get_current()


def suppression_keys() -> tuple[Any, ...] | None:
    """The context keys ``is_instrumentation_enabled()`` reads, or None if this OTel version hides them."""
    try:
        from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
        from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY_PLAIN
    except ImportError:
        return None
    return (_SUPPRESS_INSTRUMENTATION_KEY, _SUPPRESS_INSTRUMENTATION_KEY_PLAIN)

"""``RomaInstrumentor``: the entry point ``opentelemetry-instrument`` loads, and the one-call API.

``instrument(tracer_provider=..., meter_provider=..., config=...)`` builds the tracer and every
instrument once, then patches DSPy (modules, LMs, tools, the parallel executor), toolkit classes and
ROMA when present. roma-otel imports none of ROMA (nor a configured toolkit base class's module): what
the program has not imported yet is patched when it imports it (a post-import hook, see ``imports``).
``uninstrument()`` restores every original, in reverse order, and removes that hook.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from roma_otel import telemetry
from roma_otel.compat import degraded
from roma_otel.compat import otel as otel_compat
from roma_otel.config import RomaOtelConfig, load_config
from roma_otel.instrumentation.patching import Patcher
from roma_otel.package import _instruments

__all__ = ["RomaInstrumentor"]

logger = logging.getLogger("roma_otel")


class RomaInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments DSPy programs and ROMA agents. A singleton, as every ``BaseInstrumentor``."""

    _lock = threading.Lock()

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    @property
    def prometheus_endpoint(self) -> Any:
        """The endpoint roma-otel started (``observability.prometheus.enabled``), or None."""
        return getattr(self, "_endpoint", None)

    @property
    def mlflow_bridge(self) -> Any:
        """The MLflow bridge roma-otel started (``observability.mlflow.enabled``), or None."""
        return getattr(self, "_mlflow", None)

    @property
    def telemetry(self) -> telemetry.Telemetry | None:
        return telemetry.ACTIVE

    def _instrument(self, **kwargs: Any) -> None:
        config = kwargs.get("config")
        if config is None:
            config = load_config()
        elif not isinstance(config, RomaOtelConfig):
            raise TypeError(f"config must be a roma_otel.config.RomaOtelConfig, got {type(config).__name__}")

        meter_provider = kwargs.get("meter_provider")
        self._endpoint = None
        prom = config.observability.prometheus
        if prom.enabled and meter_provider is None:
            from roma_otel.exporters.prometheus import start_prometheus_endpoint

            self._endpoint = start_prometheus_endpoint(prom.host, prom.port)
            meter_provider = self._endpoint.meter_provider

        tel = telemetry.Telemetry(config, kwargs.get("tracer_provider"), meter_provider, kwargs.get("logger_provider"))
        otel_compat.paths()  # verify the SDK's private fast paths now, on the installed SDK
        patcher = Patcher()
        from roma_otel.instrumentation.lm import instrument_lm
        from roma_otel.instrumentation.modules import instrument_modules
        from roma_otel.instrumentation.roma import instrument_roma
        from roma_otel.instrumentation.threads import instrument_threads
        from roma_otel.instrumentation.tools import instrument_tools

        base_classes = config.observability.toolkit_metrics.toolkit_base_classes
        # Each part on its own: one that meets a shape it does not know is skipped with a warning (see
        # compat.degraded) and the others still instrument; nothing of it is raised into the program.
        for package, what, step in (
            ("dspy", "module spans", lambda: instrument_modules(patcher)),
            ("dspy", "LM spans", lambda: instrument_lm(patcher)),
            ("dspy", "trace context across dspy.Parallel worker threads", lambda: instrument_threads(patcher)),
            ("dspy", "tool spans", lambda: instrument_tools(patcher, base_classes)),
            ("roma-dspy", "ROMA executions, tasks and toolkit lifecycle", lambda: instrument_roma(patcher)),
        ):
            try:
                step()
            except Exception as err:
                degraded.report(package, what, err)
        degraded.take_uncounted(tel)
        self._patcher = patcher
        self._postgres = self._start_postgres(config, tel, kwargs.get("tracer_provider"))
        self._mlflow = None
        if config.observability.mlflow.enabled:
            from roma_otel.mlflow.bridge import start_bridge

            self._mlflow = start_bridge(config, tel, kwargs.get("tracer_provider"), patcher)
        telemetry.ACTIVE = tel

    @staticmethod
    def _start_postgres(config: RomaOtelConfig, tel: telemetry.Telemetry, tracer_provider: Any) -> Any:
        """Add the Postgres writer to the tracer provider when ``storage.postgres`` is enabled."""
        pg = config.storage.postgres
        if not pg.enabled:
            return None
        if not pg.connection_url:
            raise ValueError("storage.postgres.enabled is true but storage.postgres.connection_url is not set")
        from opentelemetry import trace

        from roma_otel.exporters.postgres import PostgresSpanProcessor
        from roma_otel.exporters.postgres_process import PostgresProcessSpanProcessor

        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if not hasattr(provider, "add_span_processor"):
            logger.warning("roma-otel: storage.postgres needs an SDK TracerProvider; Postgres persistence is off")
            return None
        tm = config.observability.toolkit_metrics
        # The writer process itself never starts another one (it runs with the SDK disabled, but code
        # it imports could still call instrument() with storage.postgres on).
        in_child = os.environ.get("ROMA_OTEL_WRITER_PROCESS") == "1"
        writer = PostgresProcessSpanProcessor if pg.writer_process and not in_child else PostgresSpanProcessor
        processor = writer(
            pg.connection_url,
            batch_size=tm.batch_size,
            persist_toolkit=tm.enabled and tm.persist_to_db,
            async_persist=tm.async_persist,
            on_drop=lambda n, reason: tel.persistence_dropped.add(n, {"bridge": "postgres", "reason": reason}),
        )
        provider.add_span_processor(processor)
        return processor

    def _uninstrument(self, **kwargs: Any) -> None:
        from roma_otel.instrumentation.tools import uninstrument_tools

        telemetry.ACTIVE = None
        uninstrument_tools()
        patcher: Patcher | None = getattr(self, "_patcher", None)
        if patcher is not None:
            patcher.restore_all()
            self._patcher = None
        bridge = getattr(self, "_mlflow", None)
        if bridge is not None:
            bridge.shutdown()  # flushes queued runs within its bound; counts the rest as dropped
            self._mlflow = None
        postgres = getattr(self, "_postgres", None)
        if postgres is not None:
            postgres.shutdown()  # flushes (bounded) and spools the rest; the provider keeps an inert processor
            self._postgres = None
        endpoint = getattr(self, "_endpoint", None)
        if endpoint is not None:
            endpoint.shutdown()
            self._endpoint = None

"""The Prometheus endpoint roma-otel can serve itself (config ``observability.prometheus``).

It uses the same OpenTelemetry Prometheus exporter as ``OTEL_METRICS_EXPORTER=prometheus``, so the
series names are identical on both paths; it gets its own registry, so only roma-otel's series are
on it and starting it twice in one process cannot collide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from roma_otel.version import __version__

__all__ = ["PrometheusEndpoint", "start_prometheus_endpoint"]

logger = logging.getLogger("roma_otel")


@dataclass
class PrometheusEndpoint:
    meter_provider: MeterProvider
    host: str
    port: int
    _server: Any
    _thread: Any
    _release: Any = None  # gives the reader's collector back before shutdown (compat.otel.prometheus_reader)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def shutdown(self) -> None:
        try:
            self._server.shutdown()
            self._server.server_close()
        finally:
            if self._release is not None:
                self._release()
            self.meter_provider.shutdown()


def start_prometheus_endpoint(host: str = "127.0.0.1", port: int = 9464) -> PrometheusEndpoint:
    """Serve roma-otel's metrics at ``http://host:port/metrics``; port 0 picks a free port."""
    from prometheus_client import CollectorRegistry, start_http_server

    from roma_otel.compat.otel import prometheus_reader

    registry = CollectorRegistry(auto_describe=True)
    reader, release = prometheus_reader(registry)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "roma-otel", "service.version": __version__}),
    )
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        release()
        provider.shutdown()
        raise OSError(f"observability.prometheus: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    actual_port = server.server_port
    logger.info("roma-otel: Prometheus metrics at http://%s:%d/metrics", host, actual_port)
    return PrometheusEndpoint(provider, host, actual_port, server, thread, release)

"""roma-otel's REST API: executions, costs, LM calls and toolkit telemetry read from PostgreSQL.

Needs ``roma-otel[api]``; ``create_app`` builds the FastAPI app and ``roma-otel serve`` runs it. The same
server takes OTLP/HTTP traces at ``POST /v1/traces`` (``api.otlp``) and writes them into the tables.
"""

from __future__ import annotations

from roma_otel.api.app import TOKEN_ENV, BearerAuthMiddleware, create_app
from roma_otel.api.otlp import OtlpSettings

__all__ = ["TOKEN_ENV", "BearerAuthMiddleware", "OtlpSettings", "create_app"]

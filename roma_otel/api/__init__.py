"""roma-otel's REST API: executions, costs, LM calls and toolkit telemetry read from PostgreSQL.

Needs ``roma-otel[api]``; ``create_app`` builds the FastAPI app and ``roma-otel serve`` runs it.
"""

from __future__ import annotations

from roma_otel.api.app import TOKEN_ENV, BearerAuthMiddleware, create_app

__all__ = ["TOKEN_ENV", "BearerAuthMiddleware", "create_app"]

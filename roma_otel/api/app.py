"""FastAPI REST API over roma-otel's PostgreSQL tables: executions, costs, LM calls and toolkit telemetry.

``create_app(storage_or_dsn, token=...)`` builds the app (ROMA's toolkit endpoints plus executions, costs,
LM traces and a health check, and the OTLP/HTTP traces receiver of ``api.otlp``); ``roma-otel serve`` runs
it under uvicorn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from roma_otel.api.otlp import OtlpSettings, otlp_router
from roma_otel.config import PostgresConfig
from roma_otel.exporters.ingest import IngestWriter
from roma_otel.storage.postgres import MAX_LIMIT, PostgresStorage, SchemaMissingError, StorageUnavailableError
from roma_otel.version import __version__

__all__ = [
    "DB_TIMEOUT",
    "EXECUTIONS_MAX_LIMIT",
    "OPEN_PATHS",
    "QUERY_TIMEOUT",
    "SERVE_SETTINGS_ENV",
    "TOKEN_ENV",
    "BearerAuthMiddleware",
    "BlankQueryMiddleware",
    "DatabaseUnavailableError",
    "app_from_environment",
    "create_app",
    "serve_settings",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "ROMA_OTEL_API_TOKEN"
# Paths answered without a bearer token.
OPEN_PATHS = frozenset({"/health"})
EXECUTIONS_MAX_LIMIT = 1000
# Seconds to wait for the database when (re)connecting, for a pooled connection, or answering /health.
DB_TIMEOUT = 5.0
# Seconds a request's query may take: a server that stops answering costs a request this much, not forever.
QUERY_TIMEOUT = 30.0

_DEFAULT_OTLP = OtlpSettings()  # never changed: a dataclass default that create_app only reads

Operation = Literal["create", "cache_hit", "cache_miss", "cleanup"]
ExecutionId = Annotated[str, Path(description="the execution's id")]
TraceLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"at most this many rows (1..{MAX_LIMIT})")]

_TOOLKIT_TRACE_FIELDS = (
    "trace_id",
    "timestamp",
    "operation",
    "toolkit_class",
    "duration_ms",
    "success",
    "error",
    "metadata",
)
_TOOL_INVOCATION_FIELDS = (
    "trace_id",
    "invoked_at",
    "toolkit_class",
    "tool_name",
    "duration_ms",
    "input_size_bytes",
    "output_size_bytes",
    "success",
    "error",
    "metadata",
)

# Errors meaning "the database cannot answer right now".
_UNAVAILABLE = (StorageUnavailableError, SchemaMissingError, OSError, TimeoutError)


class DatabaseUnavailableError(RuntimeError):
    """The storage could not be opened or reached; answered as 503."""


# --- helpers ----------------------------------------------------------------------------------------
def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"database did not answer within {DB_TIMEOUT:g}s"
    return str(exc).strip() or type(exc).__name__


async def _ready(request: Request) -> PostgresStorage:
    """The app's storage, initialized: a no-op once open, a reconnect attempt if startup could not open it."""
    storage: PostgresStorage = request.app.state.storage
    try:
        await asyncio.wait_for(storage.initialize(), DB_TIMEOUT)
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailableError(_error_text(exc)) from exc
    return storage


def _matchable(*values: str | None) -> bool:
    """False when a value can never equal a stored text (PostgreSQL text cannot hold NUL), so no query is needed."""
    return not any(v is not None and "\x00" in v for v in values)


async def _execution_storage(request: Request, execution_id: str) -> PostgresStorage:
    """The ready storage, after checking ``execution_id`` exists (404 otherwise)."""
    storage = await _ready(request)
    if not _matchable(execution_id) or await storage.get_execution(execution_id) is None:
        raise HTTPException(status_code=404, detail=f"execution {execution_id} not found")
    return storage


def _pick(record: Any, fields: Iterable[str]) -> dict[str, Any]:
    data = record.to_dict()
    return {name: data[name] for name in fields}


def _traces(execution_id: str, traces: list[dict[str, Any]]) -> dict[str, Any]:
    return {"execution_id": execution_id, "count": len(traces), "traces": traces}


# --- error responses --------------------------------------------------------------------------------
async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 whose ``detail`` names each bad parameter; ``errors`` lists them one by one."""
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, str]] = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        where, name = (loc[0], ".".join(loc[1:])) if len(loc) > 1 else ("request", ".".join(loc))
        errors.append({"parameter": name, "in": where, "message": str(err.get("msg", "invalid value"))})
    detail = "; ".join(f"invalid {e['in']} parameter '{e['parameter']}': {e['message']}" for e in errors)
    return JSONResponse(status_code=422, content={"detail": detail or "invalid request", "errors": errors})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    text = _error_text(exc)
    logger.warning("database unavailable for %s %s: %s", request.method, request.url.path, text)
    return JSONResponse(status_code=503, content={"detail": f"database unavailable: {text}"})


# --- query strings ----------------------------------------------------------------------------------
class BlankQueryMiddleware:
    """Drops query parameters given with an empty value, so ``?operation=&toolkit_class=&limit=`` (the
    endpoint templates, or a form with empty fields) means "not given": no filter, the default limit.

    Without it ``operation=`` fails validation and ``toolkit_class=`` filters on the empty string, which
    no row has.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query:
            # Latin-1 both ways maps each byte to one character and back: the kept pairs reach the app
            # byte for byte as sent (percent escapes of UTF-8 included).
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
            kept = [(k, v) for k, v in pairs if v]
            if len(kept) != len(pairs):
                scope = {**scope, "query_string": urlencode(kept, encoding="latin-1").encode("ascii")}
        await self.app(scope, receive, send)


# --- authentication ---------------------------------------------------------------------------------
class BearerAuthMiddleware:
    """Answers 401 to every HTTP request outside ``open_paths`` unless it carries ``Authorization: Bearer <token>``.

    Runs before routing, so unknown paths, bad parameters and the OpenAPI document are hidden as well.
    Tokens are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, length not revealed.
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode("utf-8")).digest()
        self._open = frozenset(open_paths)

    def _authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        supplied = hashlib.sha256(credentials.strip()).digest()
        return hmac.compare_digest(supplied, self._digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in self._open or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        has_header = any(k.lower() == b"authorization" for k, _ in scope.get("headers", ()))
        challenge = 'Bearer error="invalid_token"' if has_header else "Bearer"
        detail = "invalid bearer token" if has_header else "missing bearer token"
        response = JSONResponse(status_code=401, content={"detail": detail}, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


# --- the app ----------------------------------------------------------------------------------------
def create_app(
    storage_or_dsn: PostgresStorage | PostgresConfig | str,
    *,
    token: str | None = None,
    otlp: OtlpSettings | None = _DEFAULT_OTLP,
) -> FastAPI:
    """The REST API over ``storage_or_dsn`` (a storage, a PostgresConfig or a DSN).

    The lifespan opens the storage at startup and closes it at shutdown. If the database cannot be reached at
    startup the app still starts: /health answers 503 and every request retries the connection.
    With ``token``, every path except /health requires ``Authorization: Bearer <token>``.
    ``otlp``: the OTLP/HTTP traces receiver's settings (``POST /v1/traces``, see ``api.otlp``); None turns
    it off.
    """
    storage = (
        storage_or_dsn
        if isinstance(storage_or_dsn, PostgresStorage)
        else PostgresStorage(storage_or_dsn, wait_timeout=DB_TIMEOUT, query_timeout=QUERY_TIMEOUT)
    )
    if token is not None and not token.strip():
        raise ValueError("token must be a non-empty string (or None for no authentication)")
    writer = (
        IngestWriter(storage.conninfo, connections=otlp.connections, max_queued_spans=otlp.max_queued_spans)
        if otlp is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if writer is not None:
            writer.start()
        try:
            await asyncio.wait_for(storage.initialize(), DB_TIMEOUT)
        except _UNAVAILABLE as exc:
            logger.warning(
                "roma-otel API: database not available at startup (%s); retrying per request", _error_text(exc)
            )
        try:
            yield
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.close)  # waits for writes in progress
            await storage.close()

    app = FastAPI(
        title="roma-otel",
        version=__version__,
        description="Executions, costs, LM calls and toolkit telemetry recorded by roma-otel in PostgreSQL.",
        lifespan=lifespan,
    )
    app.state.storage = storage
    app.state.ingest = writer
    if writer is not None and otlp is not None:
        app.include_router(otlp_router(writer, otlp))
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type in (DatabaseUnavailableError, StorageUnavailableError, SchemaMissingError):
        app.add_exception_handler(exc_type, _unavailable)
    app.add_middleware(BlankQueryMiddleware)
    if token is not None:
        app.add_middleware(BearerAuthMiddleware, token=token)

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> JSONResponse:
        """``{"status": "ok", "database": "ok"}``, or 503 with the database's error; with the OTLP receiver
        on, also its counts since start (``"otlp": {"accepted_spans", "rejected_spans", "in_flight_spans"}``),
        of the answering process only under ``serve --workers N``."""
        extra = {"otlp": writer.stats()} if writer is not None else {}
        try:
            await storage.ping(DB_TIMEOUT)
        except Exception as exc:  # any failure to answer is "not healthy", never a 500
            content = {"status": "error", "database": _error_text(exc), **extra}
            return JSONResponse(status_code=503, content=content)
        return JSONResponse(content={"status": "ok", "database": "ok", **extra})

    @app.get("/executions", tags=["executions"])
    async def list_executions(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=EXECUTIONS_MAX_LIMIT, description="page size")] = 50,
        offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="rows to skip")] = 0,
        status: Annotated[str | None, Query(description="only executions with this status")] = None,
    ) -> dict[str, Any]:
        """Executions, newest first."""
        db = await _ready(request)
        records = await db.list_executions(limit=limit, offset=offset, status=status) if _matchable(status) else []
        return {"count": len(records), "executions": [r.to_dict() for r in records]}

    @app.get("/executions/{execution_id}", tags=["executions"])
    async def get_execution(request: Request, execution_id: ExecutionId) -> dict[str, Any]:
        """One execution's row."""
        db = await _ready(request)
        record = await db.get_execution(execution_id) if _matchable(execution_id) else None
        if record is None:
            raise HTTPException(status_code=404, detail=f"execution {execution_id} not found")
        return record.to_dict()

    @app.get("/executions/{execution_id}/toolkit-metrics", tags=["toolkits"])
    async def toolkit_metrics(request: Request, execution_id: ExecutionId) -> dict[str, Any]:
        """Toolkit lifecycle and tool-call aggregates, in ROMA's shape."""
        db = await _execution_storage(request, execution_id)
        return await db.get_toolkit_metrics_summary(execution_id)

    @app.get("/executions/{execution_id}/toolkit-traces", tags=["toolkits"])
    async def toolkit_traces(
        request: Request,
        execution_id: ExecutionId,
        operation: Annotated[Operation | None, Query(description="create, cache_hit, cache_miss or cleanup")] = None,
        toolkit_class: Annotated[str | None, Query(description="e.g. SerperToolkit")] = None,
        limit: TraceLimit = 1000,
    ) -> dict[str, Any]:
        """Toolkit lifecycle events in time order."""
        db = await _execution_storage(request, execution_id)
        rows = []
        if _matchable(toolkit_class):
            rows = await db.get_toolkit_traces(
                execution_id, operation=operation, toolkit_class=toolkit_class, limit=limit
            )
        return _traces(execution_id, [_pick(r, _TOOLKIT_TRACE_FIELDS) for r in rows])

    @app.get("/executions/{execution_id}/tool-invocations", tags=["toolkits"])
    async def tool_invocations(
        request: Request,
        execution_id: ExecutionId,
        toolkit_class: Annotated[str | None, Query(description="e.g. SerperToolkit")] = None,
        tool_name: Annotated[str | None, Query(description="e.g. search_web")] = None,
        limit: TraceLimit = 1000,
    ) -> dict[str, Any]:
        """Individual tool calls in the order they started."""
        db = await _execution_storage(request, execution_id)
        rows = []
        if _matchable(toolkit_class, tool_name):
            rows = await db.get_tool_invocation_traces(
                execution_id, toolkit_class=toolkit_class, tool_name=tool_name, limit=limit
            )
        return _traces(execution_id, [_pick(r, _TOOL_INVOCATION_FIELDS) for r in rows])

    @app.get("/executions/{execution_id}/costs", tags=["lm"])
    async def costs(request: Request, execution_id: ExecutionId) -> dict[str, Any]:
        """Cost, tokens and latency in total, per module and per model."""
        db = await _execution_storage(request, execution_id)
        return await db.get_execution_costs(execution_id)

    @app.get("/executions/{execution_id}/lm-traces", tags=["lm"])
    async def lm_traces(
        request: Request,
        execution_id: ExecutionId,
        module: Annotated[str | None, Query(description="only calls of this module, e.g. planner")] = None,
        limit: TraceLimit = 1000,
    ) -> dict[str, Any]:
        """Language-model calls in call order."""
        db = await _execution_storage(request, execution_id)
        rows = await db.get_lm_traces(execution_id, module=module, limit=limit) if _matchable(module) else []
        traces = [{k: v for k, v in r.to_dict().items() if k != "execution_id"} for r in rows]
        return _traces(execution_id, traces)

    return app


# `roma-otel serve --workers N`: uvicorn starts N processes from an import string, so the settings the command
# resolved (flags, variables, config file) reach them in this variable, as JSON.
SERVE_SETTINGS_ENV = "_ROMA_OTEL_SERVE_SETTINGS"


def serve_settings(url: str, token: str | None, otlp: OtlpSettings | None) -> str:
    """The JSON ``app_from_environment`` rebuilds the app from."""
    return json.dumps({"url": url, "token": token, "otlp": None if otlp is None else dataclasses.asdict(otlp)})


def app_from_environment() -> FastAPI:
    """The app of one ``roma-otel serve --workers N`` process (a uvicorn factory), from ``SERVE_SETTINGS_ENV``."""
    # Taken out of this worker's environment: the token and URL need not reach what the app may start.
    settings = json.loads(os.environ.pop(SERVE_SETTINGS_ENV))
    otlp = None if settings["otlp"] is None else OtlpSettings(**settings["otlp"])
    return create_app(settings["url"], token=settings["token"], otlp=otlp)

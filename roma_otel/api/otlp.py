"""``POST /v1/traces``: the OTLP/HTTP traces receiver of ``roma-otel serve``.

A Collector's ``otlphttp`` exporter, or an app's own ``OTLPSpanExporter``, sends roma-otel's spans here
instead of each app holding database connections and credentials. Bodies are OTLP protobuf or OTLP/JSON,
optionally gzip- or deflate-compressed (``storage.otlp`` decodes them); rows are written and committed
before the answer (``exporters.ingest``). Answers follow the OTLP/HTTP specification:

- 200, in the request's encoding, with ``partial_success`` when some spans could not be stored (the
  sender must not retry those); spans from other instrumentation scopes are skipped without a word;
- 400 for a body that cannot be decoded; 413 for one over the limit (compressed or not); 415 for another
  content type or encoding;
- 503 with ``Retry-After`` when the database is away or the writer is full. Not 429: the OpenTelemetry
  SDK 1.38 exporter retries 408 and 5xx only, and would drop the data on a 429;
- 401 without the bearer token, when one is configured (``api.app.BearerAuthMiddleware``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import anyio.to_thread
from fastapi import APIRouter, Request, Response

from roma_otel.exporters.ingest import Full, IngestWriter, Unavailable
from roma_otel.storage import otlp

__all__ = ["DEFAULT_MAX_BODY_BYTES", "OtlpSettings", "otlp_router"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # decompressed; the Collector's batches are far smaller
TRACES_PATH = "/v1/traces"

# google.rpc.Code numbers for the Status body of an error answer.
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _UNAVAILABLE = 3, 8, 14


@dataclass(frozen=True)
class OtlpSettings:
    """The receiver's settings (``roma-otel serve --otlp-*``)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued_spans: int = 20_000
    connections: int = 2

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queued_spans", "connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = '--otlp-' + name.replace('_', '-')
                raise ValueError(f"{flag} (OtlpSettings.{name}) must be a positive integer, got {value!r}")


def otlp_router(writer: IngestWriter, settings: OtlpSettings) -> APIRouter:
    router = APIRouter()
    limit = settings.max_body_bytes

    @router.post(TRACES_PATH, tags=["otlp"], response_class=Response)
    async def export_traces(request: Request) -> Response:
        """OTLP/HTTP ExportTraceServiceRequest, protobuf or JSON; rows are committed before the answer."""
        try:
            media = otlp.media_type(request.headers.get("content-type"))
        except otlp.UnsupportedMediaError as exc:
            return _error(otlp.JSON, 415, _INVALID_ARGUMENT, str(exc))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(media, 413, _INVALID_ARGUMENT, f"body of {declared} bytes is over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # bounded: an endless body is cut off at the limit
            size += len(chunk)
            if size > limit:
                return _error(media, 413, _INVALID_ARGUMENT, f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        encoding = request.headers.get("content-encoding")
        try:
            decoded = await anyio.to_thread.run_sync(_decode, b"".join(chunks), encoding, media, limit)
        except otlp.UnsupportedMediaError as exc:
            return _error(media, 415, _INVALID_ARGUMENT, str(exc))
        except otlp.BodyTooLargeError as exc:
            return _error(media, 413, _INVALID_ARGUMENT, str(exc))
        except otlp.OtlpDecodeError as exc:
            return _error(media, 400, _INVALID_ARGUMENT, str(exc))
        try:
            result = await writer.submit(decoded.records)
        except Unavailable as exc:
            code = _RESOURCE_EXHAUSTED if isinstance(exc, Full) else _UNAVAILABLE
            return _error(media, 503, code, str(exc), retry_after=exc.retry_after)
        if decoded.rejected:
            writer.count_rejected(decoded.rejected)
        rejected = decoded.rejected + result.rejected
        messages = [*decoded.errors, *result.messages]
        if rejected:
            logger.warning("roma-otel OTLP: %d spans rejected: %s", rejected, "; ".join(messages))
        return _success(media, rejected, "; ".join(messages))

    return router


def _decode(body: bytes, encoding: str | None, media: str, limit: int) -> otlp.Decoded:
    return otlp.decode(otlp.decompress(body, encoding, limit), media)


def _success(media: str, rejected: int, message: str) -> Response:
    """ExportTraceServiceResponse: empty for full success, ``partial_success`` when spans were rejected."""
    if media == otlp.JSON:
        body: dict[str, object] = {}
        if rejected:
            # int64 as a decimal string, as the protobuf JSON mapping writes it.
            body["partialSuccess"] = {"rejectedSpans": str(rejected), "errorMessage": message}
        return Response(json.dumps(body), media_type=otlp.JSON)
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return Response(response.SerializeToString(), media_type=otlp.PROTOBUF)


def _error(media: str, status: int, code: int, message: str, retry_after: int | None = None) -> Response:
    """A google.rpc.Status body, in the request's encoding."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if media == otlp.JSON:
        return Response(json.dumps({"code": code, "message": message}), status, headers, media_type=otlp.JSON)
    from google.rpc.status_pb2 import Status

    body = Status(code=code, message=message).SerializeToString()
    return Response(body, status, headers, media_type=otlp.PROTOBUF)

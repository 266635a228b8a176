"""What runs around every route: request id, API key, access log and request metrics, the docs pages' content
policy, and the body size cap."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
import uuid

from fastapi import Request

from kosmos_serve.errors import KosmosServeError, PayloadTooLargeError, UnauthorizedError
from kosmos_serve.server.errors import ErrorMap
from kosmos_serve.server.logs import request_id
from kosmos_serve.server.metrics import route_label
from kosmos_serve.server.state import ServiceState

logger = logging.getLogger("kosmos_serve.server")
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
DOCS_ASSETS = "/docs/static"  # the scripts and styles of the docs pages, open like the pages that load them
# The docs pages load from the service alone, on a machine without internet as on one with it (ReDoc would
# fetch its "API docs by Redocly" logo from Redocly's CDN); inline scripts and styles, data: and blob: URLs are theirs.
DOCS_POLICY = "default-src 'self' 'unsafe-inline' data: blob:"
OPEN_PATHS = {"/health", "/ready", "/openapi.json", *DOCS_PAGES}


async def observe_and_authorise(request: Request, call_next):
    """Request id, API key, access log and request metrics around every route; the docs pages' content policy."""
    state: ServiceState = request.app.state.service
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    token = request_id.set(rid)
    began = time.perf_counter()
    route = route_label(request.scope, request.app.routes)  # before routing, whose scope changes in mounted apps
    try:
        if state.settings.api_key is not None and not _is_open(request.url.path):
            _check_api_key(request, state.settings.api_key.get_secret_value())
        response = await call_next(request)
    except KosmosServeError as error:  # raised before routing (API key)
        response = request.app.state.error_map.response(error, request)
    seconds = time.perf_counter() - began
    state.metrics.record_request(route, response.status_code, seconds)
    response.headers["X-Request-ID"] = rid
    if request.url.path in DOCS_PAGES:
        response.headers["Content-Security-Policy"] = DOCS_POLICY
    level = logging.DEBUG if request.url.path.startswith("/demo/") else logging.INFO  # the page's assets and polling
    logger.log(level, "%s %s -> %d in %.0f ms", request.method, request.url.path, response.status_code, seconds * 1000)
    request_id.reset(token)
    return response


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(f"{DOCS_ASSETS}/")


def _check_api_key(request: Request, expected: str) -> None:
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization.lower().startswith("bearer "):
        given = authorization[len("bearer ") :].strip()
    if given is None and authorization.lower().startswith("basic "):  # Label Studio's ML backend auth: key as password
        given = _basic_auth_password(authorization)
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise UnauthorizedError("A valid API key is needed: send `Authorization: Bearer <key>` or `X-API-Key: <key>`.")


def _basic_auth_password(authorization: str) -> str | None:
    try:
        return base64.b64decode(authorization[len("basic ") :].strip(), validate=True).decode().partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` is refused with 413, by its Content-Length or as it streams in.

    A body sent without a length (chunked) is counted as it arrives; once over the limit, reading it
    fails, and whatever the app answers to that failure (a parser's 400, say) is replaced by the 413.
    """

    def __init__(self, app, max_bytes: int, error_map: ErrorMap):
        self.app = app
        self.max_bytes = max_bytes
        self.error_map = error_map

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = PayloadTooLargeError(f"The request body is larger than the {self.max_bytes}-byte upload limit.")

        async def refuse() -> None:
            await self.error_map.response(too_large, Request(scope))(scope, receive, send)

        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await refuse()
        received = 0
        exceeded = answered = False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                exceeded = True
                raise too_large
            return message

        async def send_413_once_exceeded(message):
            nonlocal answered
            if not exceeded:
                return await send(message)
            if not answered:  # the app's own answer to the failed read is dropped, start and body alike
                answered = True
                await refuse()

        try:
            await self.app(scope, counted_receive, send_413_once_exceeded)
        except PayloadTooLargeError:
            if not answered:
                await refuse()

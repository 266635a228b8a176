"""The one error map: whatever is raised while answering becomes an `ErrorAnswer`, which each protocol renders.

`error_answer` decides once, for every protocol, what an error means: a domain error
(`kosmos_serve.errors`) answers its own status, code and message, with Retry-After on a 503
`ServiceBusyError` and `WWW-Authenticate` on a 401; FastAPI's request validation is a 422
`invalid_request`; Starlette's HTTP errors (no such route or method, a body that cannot be parsed) keep
their status; anything else is logged and answered as a 500 `internal_error` that holds no internal text.
An `ErrorFormat` then writes the answer in the wire shape of the protocol that owns the path: the
service's own `{"error": {"code", "message"}}` unless OpenAI, Label Studio or Supervisely claims it. An error
about one input of the request (its `field`) is said in the protocol's words: the message begins with the
protocol's name for that input (`ErrorFormat.names`; the service's own routes share the domain's names).

Errors reach the map from three places: the app's exception handlers (the service's routes, and unknown
routes or methods under any prefix), the middleware (API key and body size, before any route), and
`AnsweringRoute`, the protocols' route class. It answers even an unexpected error inside the route, so
that the answer passes back through the middleware (X-Request-ID, access log, metrics) like the
protocol's other answers; an unexpected error on the service's own routes reaches Starlette's outermost
handler instead, and its message names the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from kosmos_serve.errors import KosmosServeError, ServiceBusyError, UnauthorizedError, describe_validation_errors
from kosmos_serve.server.logs import request_id

logger = logging.getLogger("kosmos_serve.server")
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


@dataclass(frozen=True)
class ErrorAnswer:
    """What to answer for an error, before a protocol writes it in its wire shape."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the request field at fault, where the error names one (OpenAI reports it)
    problems: tuple[dict, ...] | None = None  # a validation error's problems, for protocols that word them their way


def error_answer(error: Exception, names: Mapping[str, str] | None = None) -> ErrorAnswer:
    """The answer to `error`, whatever raised it, an input at fault called by `names` (None: the domain's names);
    an unexpected error is logged with its traceback."""
    if isinstance(error, KosmosServeError):
        param = getattr(error, "param", None) or error.field_name(names)
        return ErrorAnswer(error.status, error.code, error.naming(names), _headers(error), param)
    if isinstance(error, RequestValidationError):
        problems = tuple(error.errors())
        return ErrorAnswer(422, "invalid_request", describe_validation_errors(list(problems)), problems=problems)
    if isinstance(error, StarletteHTTPException):
        return ErrorAnswer(error.status_code, HTTP_ERROR_CODES.get(error.status_code, "http_error"), str(error.detail))
    logger.error("Unhandled error", exc_info=error)
    message = f"Internal error; the service log has the details (request id {request_id.get()})."
    return ErrorAnswer(500, "internal_error", message)


def _headers(error: KosmosServeError) -> dict[str, str]:
    if isinstance(error, ServiceBusyError):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, UnauthorizedError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


@dataclass(frozen=True)
class ErrorFormat:
    """A protocol's error body: which paths are the protocol's, how it writes an answer there, and its name for
    each request input an error may be about (the domain's name -> the protocol's; None: the domain's names)."""

    owns: Callable[[str], bool]
    render: Callable[[ErrorAnswer, Request], Response]
    names: Mapping[str, str] | None = None


def render_service_error(answer: ErrorAnswer, request: Request) -> Response:
    """The service's own error body, `{"error": {"code", "message"}}`."""
    body = {"error": {"code": answer.code, "message": answer.message}}
    return JSONResponse(body, answer.status, headers=answer.headers)


SERVICE_ERRORS = ErrorFormat(owns=lambda path: True, render=render_service_error)


class ErrorMap:
    """The error formats of one app's protocols, the service's own last: the first that owns a path answers there."""

    def __init__(self, protocols: Sequence[ErrorFormat]):
        self.formats = (*protocols, SERVICE_ERRORS)

    def response(self, error: Exception, request: Request) -> Response:
        """`error` answered in the format of the protocol that owns `request`'s path."""
        error_format = next(known for known in self.formats if known.owns(request.url.path))
        return error_format.render(error_answer(error, error_format.names), request)

    async def handle(self, request: Request, error: Exception) -> Response:
        """The exception handler the app calls: `response`, in Starlette's argument order."""
        return self.response(error, request)


def add_error_map(app: FastAPI, error_map: ErrorMap) -> ErrorMap:
    """Answer every error `app` raises through `error_map` (kept as `app.state.error_map`)."""
    app.state.error_map = error_map
    for kind in (KosmosServeError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, error_map.handle)
    return error_map


class AnsweringRoute(APIRoute):
    """A route that answers every error raised in it through the error map, an unexpected one included."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def handle_answering_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as error:  # noqa: BLE001 - whatever a route raises is answered, in its protocol's shape
                return request.app.state.error_map.response(error, request)

        return handle_answering_errors

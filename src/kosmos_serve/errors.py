"""Domain errors: each carries an HTTP-style status and a message written for people.

The CLI turns any of them into its message and exit code 1; the HTTP layer turns them into a JSON
error body with `status`. Internal exception text never reaches a user through these classes.
"""

from __future__ import annotations


class KosmosServeError(Exception):
    """Base class of every error a user may see; `message` says what is wrong and how to fix it."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidImageError(KosmosServeError):
    """The upload is not a decodable, complete image."""

    status = 400
    code = "invalid_image"


class ImageFetchStatusError(InvalidImageError):
    """The host of an image URL answered with a status other than 200; `http_status` is that status."""

    def __init__(self, message: str, http_status: int):
        super().__init__(message)
        self.http_status = http_status


class ImageTooLargeError(KosmosServeError):
    """The image has more pixels (or bytes) than the configured cap."""

    status = 413
    code = "image_too_large"


class InvalidBoxError(KosmosServeError):
    """A box is malformed, inverted or outside the image."""

    status = 422
    code = "invalid_box"


class InvalidRequestError(KosmosServeError):
    """A task, its inputs or a generation parameter is unknown, missing or out of range.

    `field` names the request input at fault where one limit decides it ("prompt", "phrases",
    "max_new_tokens"), so that a protocol can point at its own field for it.
    """

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ModelLoadError(KosmosServeError):
    """The model could not be found or loaded."""

    status = 503
    code = "model_unavailable"


class PayloadTooLargeError(KosmosServeError):
    """The request body is larger than the configured upload cap."""

    status = 413
    code = "payload_too_large"


class ServiceBusyError(KosmosServeError):
    """The queue is full or the model is not ready yet; `retry_after` says when to try again (seconds)."""

    status = 503
    code = "service_busy"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(KosmosServeError):
    """The request did not finish within the configured time."""

    status = 504
    code = "timeout"


class ClientGoneError(KosmosServeError):
    """The client disconnected before its answer was ready (nginx's 499); nobody reads this answer."""

    status = 499
    code = "client_closed_request"


class UnauthorizedError(KosmosServeError):
    """The API key is missing or wrong."""

    status = 401
    code = "unauthorized"


def describe_validation_errors(problems: list[dict]) -> str:
    """Pydantic's error list as one line for people: `field: what is wrong` per problem, never the input's repr.

    >>> describe_validation_errors([{"loc": ("body", "temperature"), "msg": "Input should be a finite number",
    ...                              "type": "finite_number"}])
    'temperature: Input should be a finite number'
    """
    lines = []
    for problem in problems:
        location = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "form")]
        field = ".".join(location) or "body"
        message = problem["msg"]
        if problem.get("type") == "value_error" and "UploadFile" in message:  # FastAPI's check of a file field
            message = f"must be a file, sent as a multipart/form-data file part (curl -F {field}=@image.png)"
        lines.append(f"{field}: {message}")
    return "; ".join(lines)

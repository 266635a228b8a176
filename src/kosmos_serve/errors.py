"""Domain errors: each carries an HTTP-style status and a message written for people.

The CLI turns any of them into its message and exit code 1; the HTTP layer turns them into a JSON
error body with `status`. Internal exception text never reaches a user through these classes.

An error about one input of a request names it in `field`, by the domain's name for it (`phrases`, `boxes`,
`prompt`, `min_score`: the names of `TaskInput` and `GenerationParams`, which the JSON API shares), and its
message names no flag or field. Each surface says which input it is in its own words, `naming` it: the CLI by
its flag (`--phrase`), a protocol by its own field (`settings.text_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class KosmosServeError(Exception):
    """Base class of every error a user may see; `message` says what is wrong and how to fix it.

    `field` names the request input at fault, where one input is ("prompt", "phrases", "max_new_tokens").
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:  # a Python caller's words are the domain's: TaskInput's and GenerationParams' fields
        return self.naming()

    def field_name(self, names: Mapping[str, str] | None = None) -> str | None:
        """The caller's name for the input at fault: `names[field]`, or with no `names` the domain's own name;
        None when the error is about no one input, or `names` has no name for it."""
        if self.field is None or names is None:
            return self.field
        return names.get(self.field)

    def naming(self, names: Mapping[str, str] | None = None) -> str:
        """The message as a caller reads it: after the caller's name for the input at fault, when it has one.

        >>> error = InvalidRequestError("Task 'detection' needs at least one phrase to look for.", field="phrases")
        >>> error.naming({"phrases": "--phrase"})
        "--phrase: Task 'detection' needs at least one phrase to look for."
        >>> error.naming()
        "phrases: Task 'detection' needs at least one phrase to look for."
        """
        name = self.field_name(names)
        return f"{name}: {self.message}" if name else self.message


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
    """A task, its inputs or a generation parameter is unknown, missing or out of range."""

    status = 422
    code = "invalid_request"


class InvalidInputsError(InvalidRequestError):
    """Several inputs out of range at once: `errors` holds the error of each, its field with it.

    >>> both = InvalidInputsError([InvalidRequestError("Input should be greater than 0.", field="top_p"),
    ...                            InvalidRequestError("Input should be at most 1.", field="min_score")])
    >>> both.naming({"top_p": "--top-p", "min_score": "--min-score"})
    '--top-p: Input should be greater than 0; --min-score: Input should be at most 1.'
    """

    def __init__(self, errors: Sequence[KosmosServeError]):
        self.errors = tuple(errors)
        super().__init__(self.naming())

    def naming(self, names: Mapping[str, str] | None = None) -> str:
        return "; ".join(error.naming(names).removesuffix(".") for error in self.errors) + "."


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

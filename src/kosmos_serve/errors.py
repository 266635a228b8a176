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


class ModelLoadError(KosmosServeError):
    """The model could not be found or loaded."""

    status = 503
    code = "model_unavailable"

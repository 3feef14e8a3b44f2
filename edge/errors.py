"""The one error tree of the edge, each class mapped to the HTTP status it answers with.

Handlers raise these; the HTTP layer turns any ``LivedgeError`` into a response with ``status`` and the
JSON body ``{"message": error.message}``. Messages are shown to clients, so they never carry secrets.
"""

from __future__ import annotations


class LivedgeError(Exception):
    """Base of every error a client may see. ``status`` is the HTTP status code."""

    status: int = 500
    default_message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)

    def to_json(self) -> dict[str, str]:
        """The response body for this error."""
        return {"message": self.message}


class BadRequest(LivedgeError):
    status = 400
    default_message = "bad request"


class Unauthorized(LivedgeError):
    """No usable credentials: missing, malformed, expired or wrongly signed token."""

    status = 401
    default_message = "unauthorized"


class Forbidden(LivedgeError):
    """Valid credentials that do not grant this action on this stream."""

    status = 403
    default_message = "forbidden"


class NotFound(LivedgeError):
    status = 404
    default_message = "not found"


class Conflict(LivedgeError):
    status = 409
    default_message = "conflict"


class PayloadTooLarge(LivedgeError):
    status = 413
    default_message = "payload too large"


class UnsupportedMediaType(LivedgeError):
    status = 415
    default_message = "unsupported media type"


class TooManyRequests(LivedgeError):
    status = 429
    default_message = "too many requests"


class Unavailable(LivedgeError):
    status = 503
    default_message = "service unavailable"

"""Error answers: one JSON shape for every 4xx/5xx, and which failures mean "retry later"."""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError


class RetryLater(Exception):
    """A request that this process cannot settle now: answered 503 with ``Retry-After``.

    ``error`` is the answer's code (``write_queue_full``, ``outcome_unknown``), ``message``
    tells the client what it may do, ``retry_after`` is in whole seconds.
    """

    def __init__(self, error: str, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.retry_after = retry_after


def error_response(
    status: int,
    error: str,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The ``ErrorResponse`` body with ``status``; ``detail`` is always there (null if none)."""
    body: dict[str, Any] = {
        "success": False,
        "error": error,
        "message": message,
        "detail": jsonable_encoder(detail),
    }
    return JSONResponse(body, status_code=status, headers=headers)


class RequestRefused(Exception):
    """A request refused before anything is stored; each subclass is one status and code."""

    status: ClassVar[int] = 400
    error: ClassVar[str] = "bad_request"

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def response(self) -> JSONResponse:
        """The ``ErrorResponse`` answer of this refusal."""
        return error_response(self.status, self.error, self.message, self.detail)


class DuplicateHeader(RequestRefused):
    """A header that must come once came more than once (which copy counts is ambiguous)."""

    error = "duplicate_header"


class MalformedJSON(RequestRefused):
    """The body is not strict JSON (RFC 8259)."""

    error = "malformed_json"


class TooLarge(RequestRefused):
    """The body or the value is over its limit."""

    status = 413
    error = "too_large"


class UnsupportedMediaType(RequestRefused):
    """The body's Content-Type is not JSON."""

    status = 415
    error = "unsupported_media_type"


class InvalidRequest(RequestRefused):
    """Valid JSON, but not what the route takes (a field missing, of the wrong type...)."""

    status = 422
    error = "invalid_request"


class InvalidIdempotencyKey(RequestRefused):
    """The Idempotency-Key header is empty, too long or not visible ASCII."""

    error = "invalid_idempotency_key"


class InvalidPrecondition(RequestRefused):
    """An If-Match or If-None-Match header this API does not read (malformed, or both sent)."""

    error = "invalid_precondition"


class IdempotencyKeyReused(RequestRefused):
    """The Idempotency-Key was used before by a write with another method or body."""

    status = 422
    error = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was used by a write with another method or body;"
            " send a new key for a new write"
        )


class PreconditionFailed(RequestRefused):
    """The key's version is not what If-Match or If-None-Match requires: nothing stored.

    The answer carries the key's current version (``current_version`` and ``ETag``), so that
    a client can read again and retry.
    """

    status = 412
    error = "precondition_failed"

    def __init__(self, header: str, version: int | None, key: str, current_version: int) -> None:
        """``header`` required ``version`` (None: any but 0) of ``key``, at ``current_version``."""
        required = (
            "no command yet"
            if version == 0
            else "a command"
            if version is None
            else f"version {version}"
        )
        super().__init__(
            f"{header} requires {required} but the key is at version"
            f" {current_version}: nothing was stored"
        )
        self.key = key
        self.current_version = current_version

    def response(self) -> JSONResponse:
        """The ``PreconditionFailedResponse`` answer, with the current version as ETag."""
        return JSONResponse(
            {
                "success": False,
                "error": self.error,
                "message": self.message,
                "detail": None,
                "key": self.key,
                "current_version": self.current_version,
            },
            status_code=self.status,
            headers={"ETag": f'"{self.current_version}"'},
        )


class ReadModelNotEnabled(RequestRefused):
    """A route of a read model this stack does not keep (READ_MODELS)."""

    status = 404
    error = "read_model_not_enabled"


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """One line for the first validation errors: ``field: what is wrong; ...``."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def dependency_error(exc: BaseException, detail: Any = None) -> JSONResponse | None:
    """The 503 answer for a database, Redis or network failure; None for any other error."""
    if isinstance(exc, RetryLater):
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(503, exc.error, exc.message, detail, headers=headers)
    if isinstance(exc, DBAPIError):
        return error_response(
            503, "database_unavailable", "the database is unavailable; retry later", detail
        )
    if isinstance(exc, RedisError):
        return error_response(503, "redis_unavailable", "Redis is unavailable; retry later", detail)
    if isinstance(exc, OSError):
        return error_response(
            503, "dependency_unavailable", "a dependency is unreachable; retry later", detail
        )
    return None

"""Error answers: one JSON shape for every 4xx/5xx, and which failures mean "retry later"."""

from __future__ import annotations

from typing import Any

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
    """The ``ErrorResponse`` body with ``status``."""
    body: dict[str, Any] = {"success": False, "error": error, "message": message}
    if detail is not None:
        body["detail"] = jsonable_encoder(detail)
    return JSONResponse(body, status_code=status, headers=headers)


def dependency_error(exc: BaseException) -> JSONResponse | None:
    """The 503 answer for a database, Redis or network failure; None for any other error."""
    if isinstance(exc, RetryLater):
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(503, exc.error, exc.message, headers=headers)
    if isinstance(exc, DBAPIError):
        return error_response(
            503, "database_unavailable", "the database is unavailable; retry later"
        )
    if isinstance(exc, RedisError):
        return error_response(503, "redis_unavailable", "Redis is unavailable; retry later")
    if isinstance(exc, OSError):
        return error_response(
            503, "dependency_unavailable", "a dependency is unreachable; retry later"
        )
    return None

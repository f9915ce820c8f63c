"""The write API: POST /write creates, PUT /write updates; both answer with a position."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from .config import Settings
from .events import RECORD_CREATED, RECORD_UPDATED
from .models import ErrorResponse, WriteRequest, WriteResponse, parse_write_request
from .resources import Resources
from .write_path import WriteResult


def token_accepted(settings: Settings, authorization: bytes) -> bool:
    """Does an ``Authorization`` header value satisfy WRITE_API_TOKEN (always, when unset)?

    The value is compared as the bytes sent, against the token's UTF-8 bytes (what curl and
    every client send for a non-ASCII token), never decoded: decoding as Latin-1 then encoding
    again would turn a UTF-8 token into another one. ``Bearer``, in any case, then one or more
    spaces (RFC 6750), then the token; whitespace around the value is not part of it (RFC 9110).
    """
    expected = settings.write_api_token.get_secret_value()
    if not expected:
        return True
    scheme, _, given = authorization.strip(b" \t").partition(b" ")
    # compare_digest of two digests of one length: the time taken tells neither how much of a
    # guess was right nor how long the token is.
    return scheme.lower() == b"bearer" and hmac.compare_digest(
        _digest(given.lstrip(b" ")), _digest(expected.encode())
    )


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


async def require_token(request: Request) -> None:
    """With WRITE_API_TOKEN set, a write needs ``Authorization: Bearer <that token>``."""
    resources: Resources = request.app.state.resources
    # The raw value (the guard already refused a second Authorization header).
    authorization = dict(request.scope["headers"]).get(b"authorization", b"")
    if not token_accepted(resources.settings, authorization):
        raise HTTPException(
            401,
            "writes need the header 'Authorization: Bearer <token>' with the configured token",
            headers={"WWW-Authenticate": 'Bearer realm="cqrs-stack write API"'},
        )


async def write_body(request: Request) -> WriteRequest:
    """The write's body, read by ``parse_write_request`` exactly as the hot path reads it.

    The framework's own body parsing is not used: its answer for a missing or odd
    Content-Type has changed between releases, and the hot path must answer alike.
    """
    return parse_write_request(request.headers.get("content-type"), await request.body())


# The router's dependency runs before the route's: a write without the token is refused (401)
# before its body is read.
router = APIRouter(tags=["write"], dependencies=[Depends(require_token)])
WriteBody = Annotated[WriteRequest, Depends(write_body)]
# The body is read by write_body, so the OpenAPI description of it is declared here.
_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": WriteRequest.model_json_schema()}},
    }
}

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse, "description": "WRITE_API_TOKEN is set and not given"},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def _answer(result: WriteResult) -> WriteResponse:
    command = result.command
    queued = result.event_id is None
    # The original service's words: a PUT answers "updated", a POST "written".
    done = "updated" if command.event_type == RECORD_UPDATED else "written"
    return WriteResponse(
        key=command.key,
        event_id=result.event_id,
        event_type=command.event_type,
        position=command.position,
        created_at=command.created_at,
        queued=queued,
        message=(
            f"Command {done}; event queued and will be published when the stream is reachable"
            if queued
            else f"Command {done} and event published"
        ),
    )


async def write_answer(resources: Resources, body: WriteRequest, event_type: str) -> WriteResponse:
    """Store a validated write and return its answer; a too large value raises HTTP 413."""
    resources.check_value_size(body.value)
    assert resources.writer is not None
    return _answer(await resources.writer.write(body.key, body.value, event_type))


@router.post("/write", response_model=WriteResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY)
async def create_record(request: Request, body: WriteBody) -> WriteResponse:
    """Store a command and publish a RecordCreated event."""
    return await write_answer(request.app.state.resources, body, RECORD_CREATED)


@router.put("/write", response_model=WriteResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY)
async def update_record(request: Request, body: WriteBody) -> WriteResponse:
    """Store a command and publish a RecordUpdated event."""
    return await write_answer(request.app.state.resources, body, RECORD_UPDATED)

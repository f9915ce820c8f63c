"""The write API: POST /write creates, PUT /write updates; both answer with a position."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.routing import APIRoute

from .config import Settings
from .events import RECORD_CREATED, RECORD_UPDATED
from .models import ErrorResponse, WriteRequest, WriteResponse, parse_json_body
from .resources import Resources
from .write_path import WriteResult


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed strictly: duplicate keys or NaN answer 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def token_accepted(settings: Settings, authorization: str) -> bool:
    """Does an ``Authorization`` header value satisfy WRITE_API_TOKEN (always, when unset)?"""
    expected = settings.write_api_token.get_secret_value()
    if not expected:
        return True
    scheme, _, given = authorization.partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected.encode())


async def require_token(request: Request) -> None:
    """With WRITE_API_TOKEN set, a write needs ``Authorization: Bearer <that token>``."""
    resources: Resources = request.app.state.resources
    if not token_accepted(resources.settings, request.headers.get("authorization", "")):
        raise HTTPException(
            401,
            "writes need the header 'Authorization: Bearer <token>' with the configured token",
            headers={"WWW-Authenticate": 'Bearer realm="cqrs-stack write API"'},
        )


router = APIRouter(
    tags=["write"], route_class=StrictJSONRoute, dependencies=[Depends(require_token)]
)

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
    return WriteResponse(
        key=command.key,
        event_id=result.event_id,
        event_type=command.event_type,
        position=command.position,
        created_at=command.created_at,
        queued=queued,
        message=(
            "Command written; event queued and will be published when the stream is reachable"
            if queued
            else "Command written and event published"
        ),
    )


async def write_answer(resources: Resources, body: WriteRequest, event_type: str) -> WriteResponse:
    """Store a validated write and return its answer; a too large value raises HTTP 413."""
    resources.check_value_size(body.value)
    assert resources.writer is not None
    return _answer(await resources.writer.write(body.key, body.value, event_type))


@router.post("/write", response_model=WriteResponse, responses=_ERRORS)
async def create_record(request: Request, body: WriteRequest) -> WriteResponse:
    """Store a command and publish a RecordCreated event."""
    return await write_answer(request.app.state.resources, body, RECORD_CREATED)


@router.put("/write", response_model=WriteResponse, responses=_ERRORS)
async def update_record(request: Request, body: WriteRequest) -> WriteResponse:
    """Store a command and publish a RecordUpdated event."""
    return await write_answer(request.app.state.resources, body, RECORD_UPDATED)

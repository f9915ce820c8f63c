"""The write API: POST /write creates, PUT /write updates; both answer with a position."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .events import RECORD_CREATED, RECORD_UPDATED
from .models import ErrorResponse, WriteRequest, WriteResponse
from .resources import Resources
from .write_path import WriteResult

router = APIRouter(tags=["write"])

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse},
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


async def _write(request: Request, body: WriteRequest, event_type: str) -> WriteResponse:
    resources: Resources = request.app.state.resources
    resources.check_value_size(body.value)
    assert resources.writer is not None
    return _answer(await resources.writer.write(body.key, body.value, event_type))


@router.post("/write", response_model=WriteResponse, responses=_ERRORS)
async def create_record(request: Request, body: WriteRequest) -> WriteResponse:
    """Store a command and publish a RecordCreated event."""
    return await _write(request, body, RECORD_CREATED)


@router.put("/write", response_model=WriteResponse, responses=_ERRORS)
async def update_record(request: Request, body: WriteRequest) -> WriteResponse:
    """Store a command and publish a RecordUpdated event."""
    return await _write(request, body, RECORD_UPDATED)

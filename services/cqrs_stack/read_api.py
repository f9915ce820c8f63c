"""The read API: GET /read/{key}, optionally waiting for a position (read-your-writes)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Path, Query, Request, Response

from . import read_db
from .models import MAX_KEY_LENGTH, ErrorResponse, NotFoundResponse, RecordResponse
from .resources import Resources

router = APIRouter(tags=["read"])


@router.get(
    "/read/{key:key}",  # any character, newlines too (see KeyConvertor)
    response_model=RecordResponse | NotFoundResponse,
    responses={
        200: {
            "headers": {
                "ETag": {
                    "description": "The key's version as the read model has it (its number "
                    "of commands applied): send it as If-Match to write only over this state",
                    "schema": {"type": "string"},
                }
            }
        },
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
async def read_record(
    request: Request,
    key: str = Path(min_length=1, max_length=MAX_KEY_LENGTH, pattern=r"^[^\x00]+$"),
    position: int | None = Query(
        default=None,
        ge=1,
        le=2**63 - 1,
        description="Wait until the write at this position is in the read model",
    ),
    timeout: float | None = Query(  # noqa: ASYNC109 - a query parameter, not an API
        default=None,
        ge=0,
        le=60,
        description="Longest wait for `position`, in seconds (default READ_WAIT_TIMEOUT)",
    ),
) -> Response:
    """Return the record of ``key`` from the read DB and count the read.

    With ``position``, the read first waits (bounded) until that write is projected; the
    answer's ``position_reached`` says whether it was, so a stale answer is never silent.
    """
    resources: Resources = request.app.state.resources
    answer, version = await read_answer(resources, key, position, wait_seconds=timeout)
    headers = None if version is None else {"ETag": f'"{version}"'}
    return Response(answer, media_type="application/json", headers=headers)


async def read_answer(
    resources: Resources,
    key: str,
    position: int | None = None,
    wait_seconds: float | None = None,
) -> tuple[bytes, int | None]:
    """The JSON answer to a read of ``key`` (already validated), counting the read, and the
    key's version as the read model has it (its ``write_count``: the number of its commands
    applied), for the answer's ETag; None when the key is not found.

    The fields come from the read DB's typed columns, so the answer is serialised once,
    without FastAPI validating it again (``response_model`` still documents it).
    """
    reached = None
    records = resources.records
    assert records is not None
    within = None
    if position is not None:
        # The whole answer is bounded: each query of the wait by the time left, the final
        # read by that or READ_WAIT_GRACE, so it comes within the wait plus the grace.
        settings = resources.settings
        wait = settings.read_wait_timeout if wait_seconds is None else wait_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        reached = await read_db.wait_for_position(
            resources.read_pool, position, deadline, settings.read_wait_grace
        )
        within = max(deadline - loop.time(), settings.read_wait_grace)
    record = await records.get(key, within)
    if record is None:
        missing = NotFoundResponse.model_construct(
            key=key, message=f"Key not found in read model: {key}", position_reached=reached
        )
        return missing.model_dump_json().encode(), None
    found = RecordResponse.model_construct(**record, position_reached=reached)
    return found.model_dump_json().encode(), int(record["write_count"])

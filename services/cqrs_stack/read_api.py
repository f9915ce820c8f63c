"""The read API: GET /read/{key} and GET /read/{key}/history, optionally waiting for a
position (read-your-writes)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy.exc import OperationalError

from . import read_db
from .errors import InvalidRequest, ReadModelNotEnabled
from .models import (
    MAX_KEY_LENGTH,
    ErrorResponse,
    HistoryEntry,
    HistoryResponse,
    NotFoundResponse,
    RecordResponse,
)
from .projections import Projection
from .projections.history import History
from .projections.records import Records
from .resources import Resources

# Positions are PostgreSQL bigints.
MAX_POSITION = 2**63 - 1
# The bounded wait of a read with ?position= (records and history alike).
WaitTimeout = Annotated[
    float | None,
    Query(
        ge=0,
        le=60,
        description="Longest wait for `position`, in seconds (default READ_WAIT_TIMEOUT)",
    ),
]

router = APIRouter(tags=["read"])


# Before GET /read/{key}: a key's path may hold any character, so this route must match first.
@router.get(
    "/read/{key:key}/history",
    response_model=HistoryResponse,
    responses={
        404: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
async def read_history(
    request: Request,
    key: str = Path(min_length=1, max_length=MAX_KEY_LENGTH, pattern=r"^[^\x00]+$"),
    limit: int | None = Query(
        default=None, ge=1, description="Entries per page (default and at most HISTORY_PAGE_MAX)"
    ),
    before: int | None = Query(
        default=None,
        ge=1,
        le=MAX_POSITION,
        description="Only commands below this position: the previous answer's `next_before`",
    ),
    position: int | None = Query(
        default=None,
        ge=1,
        le=MAX_POSITION,
        description="Wait until the write at this position is in the history",
    ),
    timeout: WaitTimeout = None,  # noqa: ASYNC109 - a query parameter, not an API
) -> Response:
    """The commands of ``key`` newest first (position, event type, value, time), a page at a
    time, from the history read model (READ_MODELS must include ``history``)."""
    resources: Resources = request.app.state.resources
    settings = resources.settings
    if History.name not in settings.read_model_names:
        raise ReadModelNotEnabled(
            f"the read model {History.name!r} is not enabled on this stack"
            f" (READ_MODELS={settings.read_models}); add it to READ_MODELS to serve this route"
        )
    page_max = settings.history_page_max
    if limit is not None and limit > page_max:
        raise InvalidRequest(
            f"limit: at most {page_max} (HISTORY_PAGE_MAX), not {limit}",
            [{"type": "less_than_equal", "loc": ["query", "limit"], "msg": f"at most {page_max}"}],
        )
    reached, within = await _wait(resources, History, position, timeout)
    page = read_db.history_page(resources.read_pool, key, before, limit or page_max)
    try:
        # Bounded as a record's read: the answer comes within the wait plus READ_WAIT_GRACE.
        async with asyncio.timeout(within):
            rows, next_before = await page
    except TimeoutError as exc:
        raise OperationalError("read", None, exc) from exc
    answer = HistoryResponse(
        key=key,
        entries=[HistoryEntry.model_construct(**dict(row)) for row in rows],
        next_before=next_before,
        position_reached=reached,
    )
    return Response(answer.model_dump_json(), media_type="application/json")


async def _wait(
    resources: Resources,
    model: type[Projection],
    position: int | None,
    wait_seconds: float | None,
) -> tuple[bool | None, float | None]:
    """Wait (bounded) until ``model`` applied ``position``: whether it did (None when no
    position was asked), and the time left for the final read (None: unbounded)."""
    if position is None:
        return None, None
    settings = resources.settings
    wait = settings.read_wait_timeout if wait_seconds is None else wait_seconds
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    reached = await read_db.wait_for_position(
        resources.read_pool, position, deadline, settings.read_wait_grace, model
    )
    return reached, max(deadline - loop.time(), settings.read_wait_grace)


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
        le=MAX_POSITION,
        description="Wait until the write at this position is in the read model",
    ),
    timeout: WaitTimeout = None,  # noqa: ASYNC109 - a query parameter, not an API
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

    The answer is written directly (``found_json``), without a model built and FastAPI
    validating it again (``response_model`` still documents it).
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
            resources.read_pool, position, deadline, settings.read_wait_grace, Records
        )
        within = max(deadline - loop.time(), settings.read_wait_grace)
    return answer_of(key, await records.get(key, within), reached)


def answer_of(
    key: str, found: read_db.Found | None, reached: bool | None
) -> tuple[bytes, int | None]:
    """The JSON answer to a read of ``key`` that found ``found``, and its version (ETag)."""
    if found is None:
        missing = NotFoundResponse.model_construct(
            key=key, message=f"Key not found in read model: {key}", position_reached=reached
        )
        return missing.model_dump_json().encode(), None
    return found_json(found, reached), found.write_count


_REACHED = {None: b"null", True: b"true", False: b"false"}


def found_json(found: read_db.Found, reached: bool | None) -> bytes:
    """``RecordResponse`` of ``found`` as JSON, byte for byte as pydantic writes the model.

    The read DB wrote the fields up to the read count (``read_db.Found.head``); the count
    (the row's plus memory's) and ``position_reached`` are known only here. One C format.
    """
    return b'%b%d,"write_count":%d,"from_read_db":true,"position_reached":%b}' % (
        found.head,
        found.read_count,
        found.write_count,
        _REACHED[reached],
    )

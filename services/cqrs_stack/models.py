"""HTTP request and response bodies (the contract of DESIGN §2, compatible with the original)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_KEY_LENGTH = 255


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it here instead of failing on INSERT.
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (no lone surrogates)") from exc
    return value


Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH), AfterValidator(_no_nul)]
Value = Annotated[str, AfterValidator(_no_nul)]


class WriteRequest(BaseModel):
    """Body of POST and PUT /write. Strict: a number is not silently taken for a string."""

    model_config = ConfigDict(strict=True, extra="ignore")

    key: Key
    value: Value


class WriteResponse(BaseModel):
    """Answer to a write: the original fields plus the consistency token ``position``."""

    success: bool = True
    key: str
    event_id: str | None = Field(description="Stream id; null when the event is queued")
    event_type: str
    position: int = Field(description="The command's id in the write DB; pass it to a read")
    created_at: datetime
    queued: bool = Field(description="True when Redis was unavailable: published later")
    message: str


class RecordResponse(BaseModel):
    """A record from the read model."""

    success: bool = True
    key: str
    value: str
    created_at: datetime
    updated_at: datetime
    read_count: int
    write_count: int
    from_read_db: bool = True
    position_reached: bool | None = Field(
        default=None, description="Set when the read asked for a position"
    )


class NotFoundResponse(BaseModel):
    """A key that is not (yet) in the read model: 200 with success false, as the original."""

    success: bool = False
    key: str
    message: str
    from_read_db: bool = True
    position_reached: bool | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: what is wrong, in words and per field."""

    success: bool = False
    error: str
    message: str
    detail: list[dict[str, object]] | None = None


class HealthResponse(BaseModel):
    """Liveness: the process answers."""

    status: str = "healthy"
    service: str
    version: str


class ReadinessResponse(BaseModel):
    """Readiness: the dependencies this process needs are reachable."""

    status: str
    checks: dict[str, str]


class StatsResponse(BaseModel):
    """The original /stats figures plus publishing and projection lag."""

    model_config = ConfigDict(extra="allow")

    write_db_pool_size: int
    read_db_pool_size: int
    events_published: int
    events_projected: int
    read_db_records: int
    write_db_records: int
    events_queued: int
    last_written_position: int
    last_projected_position: int
    lag_events: int
    lag_seconds: float
    pending_entries: int
    dead_letters: int
    redis_available: bool

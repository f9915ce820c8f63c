"""HTTP request and response bodies (the contract of DESIGN §2, compatible with the original)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from datetime import datetime
from itertools import accumulate
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.convertors import Convertor, register_url_convertor

from .errors import InvalidRequest, MalformedJSON, UnsupportedMediaType, describe_errors

MAX_KEY_LENGTH = 255


class KeyConvertor(Convertor[str]):
    """``{key:key}`` in a route: the rest of the path, any character included.

    Starlette's ``path`` convertor is ``.*``, which stops at a newline: a key written with a
    newline could then never be read back (404). A key may hold any character but NUL.
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("key", KeyConvertor())


class _StrictJSONError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, item in pairs:
        if name in found:
            # Last-one-wins would let a proxy or a log see one key and the store another.
            raise _StrictJSONError(f"duplicate key {name[:100]!r} in a JSON object")
        found[name] = item
    return found


def _no_constant(name: str) -> Any:
    raise _StrictJSONError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


# One decoder for every body: json.loads with hooks would build a new one per call.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)

# Deepest nesting of arrays and objects a body may have (the write's object is level 1).
# Checked before parsing, so the limit does not depend on how deep the stack already is when
# the parser runs (the hot path and the routes call it from different depths).
MAX_JSON_DEPTH = 512
# A JSON string (its escapes included): what is inside one is no nesting.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 for b in range(256))


def _nested_too_deep(raw: bytes) -> bool:
    """Do arrays and objects in ``raw`` nest deeper than ``MAX_JSON_DEPTH`` (strings aside)?

    Every step runs in C (count, regex, translate, accumulate): a 2 MiB body costs a few
    milliseconds, and a body with few brackets is not scanned at all.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False  # cannot nest deeper than it has brackets
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > MAX_JSON_DEPTH


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body as strict JSON (RFC 8259): UTF-8, unique keys, no NaN/Infinity.

    The body must be UTF-8 (a leading UTF-8 byte order mark is ignored, as RFC 8259 allows);
    UTF-16, UTF-32 and encoded surrogates (CESU-8) are refused. Every refusal, whatever the
    parser raised, is a ``json.JSONDecodeError`` whose message says what is wrong, so that it
    answers 400 ``malformed_json`` like any other syntax error.
    """
    try:
        text = raw.decode("utf-8-sig")  # strict: no surrogatepass, no encoding detection
        if _nested_too_deep(raw):
            raise _StrictJSONError(f"JSON nested too deeply (over {MAX_JSON_DEPTH} levels)")
        return _STRICT_DECODER.decode(text)
    except json.JSONDecodeError:
        raise
    except _StrictJSONError as exc:
        raise json.JSONDecodeError(str(exc), "", 0) from None
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not valid UTF-8", "", exc.start) from None
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        limit = sys.get_int_max_str_digits()
        raise json.JSONDecodeError(f"a number has more than {limit} digits", "", 0) from None
    except Exception:  # whatever else the parser raises is still bad input, never a 500
        raise json.JSONDecodeError("unreadable JSON", "", 0) from None


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it here instead of failing on INSERT.
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (no lone surrogates)") from exc
    return value


# Declared in the OpenAPI schema too (a client or fuzzer must know NUL is refused); checked by
# _no_nul, whose message is clearer than a pattern mismatch.
_NO_NUL = {"pattern": "^[^\\u0000]*$"}
Key = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        json_schema_extra=_NO_NUL,
        description="1 to 255 characters, any but NUL; read it back percent-encoded",
    ),
    AfterValidator(_no_nul),
]
Value = Annotated[
    str,
    Field(json_schema_extra=_NO_NUL, description="Any text but NUL, up to MAX_VALUE_BYTES"),
    AfterValidator(_no_nul),
]


class WriteRequest(BaseModel):
    """Body of POST and PUT /write. Strict: a number is not silently taken for a string."""

    model_config = ConfigDict(strict=True, extra="ignore")

    key: Key
    value: Value


# application/<subtype>, the subtype an RFC 9110 token (so "application/x, y+json" is no JSON).
# Whitespace around a header value or parameter (RFC 9110 OWS): space and tab only, not what
# str.strip() also takes away (a no-break space is part of the value, so no JSON type).
_OWS = " \t"
_JSON_MEDIA_TYPE = re.compile(r"application/([!#$%&'*+.^_`|~0-9a-z-]+)")


def check_json_media_type(content_type: str | None) -> None:
    """Refuse (415) a Content-Type that is not JSON.

    As the original service: no Content-Type (or a blank one) means JSON, and so do
    ``application/json`` and every ``application/<something>+json``, in any case and with any
    parameters. A header with only parameters (``;charset=utf-8``) names no type: refused.
    """
    if content_type is None or not content_type.strip(_OWS):
        return
    media_type = content_type.split(";", 1)[0].strip(_OWS).lower()
    json_type = _JSON_MEDIA_TYPE.fullmatch(media_type)
    if json_type is not None and (json_type[1] == "json" or json_type[1].endswith("+json")):
        return
    given = content_type[:100]
    if not media_type:
        message = f"the Content-Type {given!r} names no media type; send application/json"
    else:
        message = f"send the body as application/json, not {given}"
    raise UnsupportedMediaType(message)


def parse_write_request(content_type: str | None, raw: bytes) -> WriteRequest:
    """The one reading of a write's body, by the hot path and the route alike.

    Content type, then JSON, then fields: 415 ``UnsupportedMediaType``, 400 ``MalformedJSON``,
    422 ``InvalidRequest``, each saying what is wrong. Whatever the framework does with bodies,
    a write is answered the same on every path.
    """
    check_json_media_type(content_type)
    if raw.count(b'"') == 8 and b"\\" not in raw:
        # Without a backslash every '"' delimits a string: four strings, and a model made of
        # them, are the names "key" and "value" and their two values, nothing else (no other
        # member, no duplicate, no number, no nesting). pydantic reads such a body from its
        # bytes in one step, as the strict reading below would; anything else, and any body
        # it refuses, is read below, which says what is wrong.
        with contextlib.suppress(ValidationError):
            return WriteRequest.model_validate_json(raw)
    return strict_write_request(raw)


def strict_write_request(raw: bytes) -> WriteRequest:
    """``parse_write_request``'s reading of every body, after its media type is checked."""
    if not raw:
        missing = [{"type": "missing", "loc": ["body"], "msg": "Field required"}]
        raise InvalidRequest("body: a JSON object with key and value is required", missing)
    try:
        document = parse_json_body(raw)
    except json.JSONDecodeError as exc:
        detail = [{"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error"}]
        raise MalformedJSON(f"the body is not valid JSON: {exc.msg}", detail) from None
    try:
        return WriteRequest.model_validate(document)
    except ValidationError as exc:
        detail = [
            {"type": err["type"], "loc": ["body", *err["loc"]], "msg": err["msg"]}
            for err in exc.errors()
        ]
        raise InvalidRequest(describe_errors(detail), detail) from None


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


class HistoryEntry(BaseModel):
    """One command of a key, as its history shows it."""

    position: int
    event_type: str
    value: str
    created_at: datetime


class HistoryResponse(BaseModel):
    """A page of a key's history, newest first; ``next_before`` fetches the next (older) page."""

    success: bool = True
    key: str
    entries: list[HistoryEntry]
    next_before: int | None = Field(
        default=None, description="Pass as `before` for the next page; null on the last page"
    )
    from_read_db: bool = True
    position_reached: bool | None = Field(
        default=None, description="Set when the read asked for a position"
    )


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: what is wrong, in words and per field."""

    success: bool = False
    error: str
    message: str
    detail: list[dict[str, object]] | None = None


class PreconditionFailedResponse(ErrorResponse):
    """412: the key's version is not what If-Match or If-None-Match requires."""

    key: str
    current_version: int = Field(description="The key's number of commands in the write DB")


class HealthResponse(BaseModel):
    """Liveness: the process answers."""

    status: str = "healthy"
    layer: str = Field(default="7-cqrs", description="As the original service answered")
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
    counts_estimated: bool = Field(
        default=False,
        description="True when a table held more than STATS_EXACT_COUNT_MAX rows: the record"
        " counts, events_published and lag_events are then the planner's estimates",
    )
    health: dict[str, Any] = Field(
        default_factory=dict,
        description="Why the projection is behind (verdict ok/degraded/stalled, reason, the"
        " group's consumers and oldest pending entry, dead letters, the catch-up watermark"
        " and the write-DB transactions pinning it): see the README's /stats section",
    )

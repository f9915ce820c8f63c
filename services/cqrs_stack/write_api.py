"""The write API: POST /write creates, PUT /write updates; both answer with a position."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from .config import Settings
from .errors import InvalidIdempotencyKey, InvalidPrecondition
from .events import RECORD_CREATED, RECORD_UPDATED
from .models import (
    ErrorResponse,
    PreconditionFailedResponse,
    WriteRequest,
    WriteResponse,
    parse_write_request,
)
from .resources import Resources
from .write_db import Precondition, original_event_id
from .write_path import WriteResult

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# Visible ASCII (RFC 5234 VCHAR), 1 to 255 of them: no space, no control, no 8-bit byte that
# two layers could decode differently.
_IDEMPOTENCY_KEY = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_IDEMPOTENCY_KEY_LENGTH)
# One strong entity tag holding a version: a number that fits a bigint, no leading zero.
_VERSION_TAG = re.compile(rb'"(0|[1-9][0-9]{0,18})"')
_MAX_VERSION = 2**63 - 1


def _version_pattern(bound: int) -> str:
    """A regular expression matching the decimal numbers 0 to ``bound``, no leading zero."""
    digits = str(bound)
    shorter = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    same = []  # as many digits as the bound: a prefix of it, then one digit below, then any
    for i, d in enumerate(digits):
        low = "1" if i == 0 else "0"
        if int(d) > int(low):
            below = f"[{low}-{int(d) - 1}]" if int(d) - 1 > int(low) else f"[{low}]"
            same.append(f"{digits[:i]}{below}[0-9]{{{len(digits) - i - 1}}}")
    same.append(digits)
    return "|".join(["0", *shorter, *same])


# The answer's header saying it repeats the answer of the write that used the key first.
REPLAYED_HEADER = "Idempotency-Replayed"


@dataclass(frozen=True, slots=True)
class WriteHeaders:
    """What a write's Idempotency-Key, If-Match and If-None-Match headers ask for."""

    idempotency_key: str | None = None
    precondition: Precondition | None = None


NO_HEADERS = WriteHeaders()


def parse_write_headers(headers: Mapping[bytes, bytes]) -> WriteHeaders:
    """Read a write's safe-write headers, on the hot path and the routes alike.

    ``Idempotency-Key``: 1 to 255 visible ASCII characters, opaque. ``If-Match``: ``*`` or one
    strong tag ``"<version>"``; ``If-None-Match``: ``*`` only; not both. Anything else is
    refused (400 ``invalid_idempotency_key`` / ``invalid_precondition``), nothing stored.
    """
    raw_key = headers.get(b"idempotency-key")
    if_match = headers.get(b"if-match")
    if_none_match = headers.get(b"if-none-match")
    if raw_key is None and if_match is None and if_none_match is None:
        return NO_HEADERS
    key = None
    if raw_key is not None:
        if not _IDEMPOTENCY_KEY.fullmatch(raw_key):
            raise InvalidIdempotencyKey(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII"
                f" characters (no spaces); got {len(raw_key)} bytes"
            )
        key = raw_key.decode("ascii")
    return WriteHeaders(key, _precondition(if_match, if_none_match))


def _precondition(if_match: bytes | None, if_none_match: bytes | None) -> Precondition | None:
    if if_match is not None and if_none_match is not None:
        raise InvalidPrecondition("send If-Match or If-None-Match, not both")
    if if_none_match is not None:
        if if_none_match != b"*":
            raise InvalidPrecondition(
                "If-None-Match takes only * (create only if the key has no command yet)"
            )
        return Precondition("If-None-Match", 0)
    if if_match is None:
        return None
    if if_match == b"*":
        return Precondition("If-Match", None)
    tag = _VERSION_TAG.fullmatch(if_match)
    if tag is None or int(tag[1]) > _MAX_VERSION:
        raise InvalidPrecondition(
            'If-Match takes * or one version in double quotes, as an ETag: If-Match: "3"'
        )
    return Precondition("If-Match", int(tag[1]))


def write_digest(
    method: str, idempotency_key: str, body: WriteRequest, precondition: Precondition | None
) -> bytes:
    """SHA-256 of the write's method, Idempotency-Key, body (its key and value) and
    precondition (If-Match / If-None-Match, as parsed): what tells a retry (same digest) from
    another write reusing the key. Each part is prefixed with its length, so that no two
    writes have the same input."""
    condition = ""
    if precondition is not None:
        version = "*" if precondition.version is None else str(precondition.version)
        condition = f"{precondition.header}:{version}"
    digest = hashlib.sha256()
    for part in (method, idempotency_key, body.key, body.value, condition):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.digest()


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

# The safe-write headers, documented as parameters (read by parse_write_headers).
_SAFE_WRITE_HEADERS: list[dict[str, Any]] = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Opaque, 1 to 255 visible ASCII characters. A retry with the same key "
        "and body answers the original answer (header Idempotency-Replayed: true) instead of "
        "writing again; the same key with another body answers 422 idempotency_key_reused. "
        "Kept IDEMPOTENCY_RETENTION seconds.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    },
    {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": "Write only if the key's version (its number of commands) is this one, "
        'as a read\'s ETag gives it ("3"); * : only if the key has a command. Else 412. '
        "Not together with If-None-Match (400 invalid_precondition).",
        "schema": {"type": "string", "pattern": f'^(\\*|"({_version_pattern(_MAX_VERSION)})")$'},
    },
    {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "* : write only if the key has no command yet. Else 412. Not together "
        "with If-Match (400 invalid_precondition).",
        "schema": {"type": "string", "enum": ["*"]},
    },
]
_REQUEST_BODY["parameters"] = _SAFE_WRITE_HEADERS

_ERRORS: dict[int | str, dict[str, object]] = {
    200: {
        "headers": {
            "ETag": {
                "description": "The key's version after this write (for writes with "
                "Idempotency-Key, If-Match or If-None-Match)",
                "schema": {"type": "string"},
            },
            REPLAYED_HEADER: {
                "description": "true: this repeats the answer of the write that used this "
                "Idempotency-Key first (nothing was written again)",
                "schema": {"type": "string", "enum": ["true"]},
            },
        }
    },
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse, "description": "WRITE_API_TOKEN is set and not given"},
    412: {
        "model": PreconditionFailedResponse,
        "description": "If-Match or If-None-Match does not hold; nothing stored",
        "headers": {
            "ETag": {
                "description": "The key's current version (as current_version)",
                "schema": {"type": "string"},
            }
        },
    },
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def _message(result: WriteResult) -> str:
    # The original service's words: a PUT answers "updated", a POST "written".
    done = "updated" if result.command.event_type == RECORD_UPDATED else "written"
    if result.event_id is None:
        return f"Command {done}; event queued and will be published when the stream is reachable"
    return f"Command {done} and event published"


def _answer(result: WriteResult) -> WriteResponse:
    command = result.command
    return WriteResponse(
        key=command.key,
        event_id=result.event_id,
        event_type=command.event_type,
        position=command.position,
        created_at=command.created_at,
        queued=result.event_id is None,
        message=_message(result),
    )


# Text that stands in a JSON string as it is: printable ASCII without '"' and '\\'.
_PLAIN_TEXT = re.compile(r"[ !#-\[\]-~]*")
_ANSWER_JSON = (
    '{"success":true,"key":"%s","event_id":%s,"event_type":"%s","position":%d,'
    '"created_at":"%s","queued":%s,"message":"%s"}'
)


def answer_json(result: WriteResult) -> bytes:
    """The JSON of a write's answer: the bytes ``WriteResponse.model_dump_json`` gives.

    Building the model and serialising it cost about 3 us per write; the answer's text is
    formatted directly instead (about 2 us), where that needs no escaping (a key and ids of
    printable ASCII, a UTC time, as every ordinary write has); anything else goes through
    the model. ``tests/unit/test_write_answer_json.py`` holds both to the same bytes.
    """
    command = result.command
    event_id = result.event_id
    created_at = command.created_at.isoformat()
    plain = (
        _PLAIN_TEXT.fullmatch(command.key) is not None
        and (event_id is None or _PLAIN_TEXT.fullmatch(event_id) is not None)
        and _PLAIN_TEXT.fullmatch(command.event_type) is not None
        and created_at.endswith("+00:00")  # pydantic writes a UTC time with "Z"
    )
    if not plain:
        return _answer(result).model_dump_json().encode()
    return (
        _ANSWER_JSON
        % (
            command.key,
            "null" if event_id is None else f'"{event_id}"',
            command.event_type,
            command.position,
            created_at[:-6] + "Z",
            "true" if event_id is None else "false",
            _message(result),
        )
    ).encode()


@dataclass(frozen=True, slots=True)
class WriteAnswer:
    """A write's answer: its outcome, as a body (``body``, ``json``), and its headers (ETag,
    Idempotency-Replayed)."""

    result: WriteResult
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> WriteResponse:
        """The answer's body as the routes return it."""
        return _answer(self.result)

    def json(self) -> bytes:
        """The answer's body as JSON, the bytes the routes would send."""
        return answer_json(self.result)


_METHODS = {RECORD_CREATED: "POST", RECORD_UPDATED: "PUT"}


async def write_answer(
    resources: Resources,
    body: WriteRequest,
    event_type: str,
    headers: WriteHeaders = NO_HEADERS,
) -> WriteAnswer:
    """Store a validated write and return its answer; a too large value raises HTTP 413.

    A retry of a write with the same Idempotency-Key answers as that write did; a failed
    precondition raises ``PreconditionFailed`` (412), a reused key ``IdempotencyKeyReused``.
    """
    resources.check_value_size(body.value)
    assert resources.writer is not None
    key = headers.idempotency_key
    result = await resources.writer.write(
        body.key,
        body.value,
        event_type,
        idempotency_key=key,
        digest=(
            b""
            if key is None
            else write_digest(_METHODS[event_type], key, body, headers.precondition)
        ),
        precondition=headers.precondition,
    )
    if not result.settled and key is not None:
        # Found committed before its writer (another process) recorded its answer.
        settings = resources.settings
        within = settings.redis_timeout + settings.write_outcome_timeout
        event_id = await original_event_id(resources.write_pool, key, within)
        result = dataclasses.replace(result, event_id=event_id, settled=True)
    answer_headers = {}
    # Only a write that asked for safe writes answers a version: the answer depends on the
    # request alone, not on the writes it shared a batch with.
    asked = headers.idempotency_key is not None or headers.precondition is not None
    if result.version is not None and asked:
        answer_headers["ETag"] = f'"{result.version}"'
    if result.replayed:
        answer_headers[REPLAYED_HEADER] = "true"
    return WriteAnswer(result, answer_headers)


async def _write(
    request: Request, response: Response, body: WriteRequest, event_type: str
) -> WriteResponse:
    headers = parse_write_headers(dict(request.scope["headers"]))
    answer = await write_answer(request.app.state.resources, body, event_type, headers)
    response.headers.update(answer.headers)
    return answer.body


@router.post("/write", response_model=WriteResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY)
async def create_record(request: Request, response: Response, body: WriteBody) -> WriteResponse:
    """Store a command and publish a RecordCreated event."""
    return await _write(request, response, body, RECORD_CREATED)


@router.put("/write", response_model=WriteResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY)
async def update_record(request: Request, response: Response, body: WriteBody) -> WriteResponse:
    """Store a command and publish a RecordUpdated event."""
    return await _write(request, response, body, RECORD_UPDATED)

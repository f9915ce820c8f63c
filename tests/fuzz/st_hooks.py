"""Schemathesis hooks for the fuzz run (loaded through SCHEMATHESIS_HOOKS).

A read may wait up to 60 s for ``?position=`` (by contract). The fuzzer would spend its whole
budget waiting, so an in-range ``timeout`` is shortened; out-of-range values are left as
generated, so negative cases stay negative.

Coverage-phase header labels are re-judged (schemathesis 4.32). The coverage phase draws the
valid value of a header from letters and digits only, so a header whose pattern needs another
character has no valid value there: every ``If-Match`` (``*`` or a version in double quotes)
does. Schemathesis then seeds such an optional header with its first invalid value (the
integer 0, sent as ``If-Match: 0``) and still labels the cases that combine optional headers
as valid, so the server's correct 400 looked like a valid request rejected. Assigning the
headers back makes schemathesis validate them against the declared schema as sent and label
the case by the result. Only the label changes: the values sent are untouched, the fuzzing
phase (which draws ``If-Match`` from the pattern) is not affected, and malformed ``If-Match``
values are still sent, now checked as the invalid input they are.

A write may carry If-Match or If-None-Match, not both (400 invalid_precondition). OpenAPI
parameters cannot say that two headers exclude each other, so the schema admits the pair and
a valid case with both would be "rejected"; such cases are left out of the valid ones only.
Invalid cases with both headers are still sent and must be refused.

An Idempotency-Key names one stored write: the same key with another method, body or
precondition answers 422 idempotency_key_reused, however well formed the request, and the
fuzzer draws the same short keys ("0") for many different writes. The hooks follow which
write each key is bound to (reserved when sent, bound by a 2xx answer, released by any other
answer: a refused write claims nothing). A valid case that would reuse a key bound or
reserved for another write is given an unused key of the same length (same alphabet, so the
length bounds are still tested); a key sent again with the same method, body and
precondition is kept, so retries are still answered
from the first write. Invalid cases keep their keys.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import schemathesis

LONGEST_WAIT = 0.2
# The Idempotency-Key alphabet (the schema's pattern ^[!-~]+$): visible ASCII.
KEY_ALPHABET = "".join(chr(code) for code in range(0x21, 0x7F))
IDEMPOTENCY_KEY = "idempotency-key"
UNUSED_KEY_TRIES = 10_000  # a run sends a few hundred keys

_lock = threading.Lock()  # schemathesis' workers are threads of one process


class _KeyUse:
    """The write (see _write_of) an Idempotency-Key is reserved or bound for.

    A plain class: schemathesis loads this file without registering it as a module, and
    dataclasses look their module up.
    """

    __slots__ = ("bound", "write")

    def __init__(self, write: tuple[str, str]) -> None:
        self.write = write
        self.bound = False


# Every Idempotency-Key sent in this run and not released.
_key_uses: dict[str, _KeyUse] = {}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _shorten_wait(case: Any) -> None:
    query = case.query
    if not isinstance(query, dict):
        return
    seconds = _seconds(query.get("timeout"))
    if seconds is not None and LONGEST_WAIT < seconds <= 60:
        query["timeout"] = LONGEST_WAIT


def _rejudge_coverage_headers(case: Any) -> None:
    meta = case.meta
    if meta is None or meta.phase.name != "coverage" or not meta.generation.mode.is_positive:
        return
    if isinstance(case.headers, Mapping) and case.headers:
        # An attribute assignment marks the headers as edited: schemathesis revalidates them
        # before the request is sent (a copy with the same items is enough).
        case.headers = dict(case.headers)


def _write_of(case: Any) -> tuple[str, str]:
    """What the server tells a retry from another write by: method, body key and value, and
    the precondition (If-Match / If-None-Match: the same key with another one is reused)."""
    body = case.body
    headers = case.headers if isinstance(case.headers, Mapping) else {}
    precondition = tuple(
        sorted(
            (name.lower(), str(value))
            for name, value in headers.items()
            if name.lower() in ("if-match", "if-none-match")
        )
    )
    if isinstance(body, Mapping):
        return (
            str(case.method).upper(),
            repr((body.get("key"), body.get("value"), precondition)),
        )
    return (str(case.method).upper(), repr((body, precondition)))


def _unused_key(length: int) -> str | None:
    """A key of ``length`` characters the run has not sent (None when none is found)."""
    for number in range(min(len(KEY_ALPHABET) ** length, UNUSED_KEY_TRIES)):
        digits = []
        for _ in range(length):
            number, digit = divmod(number, len(KEY_ALPHABET))
            digits.append(KEY_ALPHABET[digit])
        key = "".join(reversed(digits))
        if key not in _key_uses:
            return key
    return None


def _idempotency_key(case: Any) -> tuple[str, str] | None:
    """The header name as the case spells it and the key, if the case sends one."""
    headers = case.headers
    if not isinstance(headers, Mapping):
        return None
    for name, key in headers.items():
        if str(name).lower() == IDEMPOTENCY_KEY and isinstance(key, str):
            return str(name), key
    return None


def _scope_idempotency_key(case: Any, positive: bool) -> None:
    found = _idempotency_key(case)
    if found is None:
        return
    name, key = found
    write = _write_of(case)
    with _lock:
        use = _key_uses.setdefault(key, _KeyUse(write))
        if use.write == write or not positive:
            return
        fresh = _unused_key(len(key))
        updated = dict(case.headers)
        if fresh is None:
            del updated[name]
        else:
            updated[name] = fresh
            _key_uses[fresh] = _KeyUse(write)
    case.headers = updated


def _settle_idempotency_key(case: Any, status: int) -> None:
    found = _idempotency_key(case)
    if found is None:
        return
    key = found[1]
    with _lock:
        use = _key_uses.get(key)
        if use is None or use.write != _write_of(case) or use.bound:
            return
        if 200 <= status < 300:
            use.bound = True
        else:
            del _key_uses[key]


def _has_both_preconditions(case: Any) -> bool:
    headers = case.headers
    if not isinstance(headers, Mapping):
        return False
    names = {str(name).lower() for name in headers}
    return {"if-match", "if-none-match"} <= names


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Leave out valid cases with both If-Match and If-None-Match (a rule OpenAPI cannot state)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    return not _has_both_preconditions(case)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    _shorten_wait(case)
    _rejudge_coverage_headers(case)
    meta = case.meta
    _scope_idempotency_key(case, meta is not None and meta.generation.mode.is_positive)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    _settle_idempotency_key(case, int(response.status_code))

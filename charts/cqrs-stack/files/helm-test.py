"""`helm test`: write a key through the release's write API, read it back through its read API.

Runs in the release's own stack image with the standard library only. Environment:
WRITE_URL, READ_URL (the Services), WRITE_API_TOKEN (optional: the write token),
TEST_TIMEOUT (seconds for the whole test, default 60: every wait is bounded by what is
left). Exit 0 when the value read back at the
write's position is the value written; else exit 1 with what went wrong on stderr. The token
is never printed.
"""

import http.client
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

WRITE_URL = os.environ["WRITE_URL"].rstrip("/")
READ_URL = os.environ["READ_URL"].rstrip("/")
TOKEN = os.environ.get("WRITE_API_TOKEN", "")
TIMEOUT = float(os.environ.get("TEST_TIMEOUT", "60"))
DEADLINE = time.monotonic() + TIMEOUT  # the whole run, every try's wait included
READ_WAIT = 10.0  # the read API's wait for a position, per try (at most 60)


class Failed(Exception):
    """What the test found wrong, said to whoever runs `helm test`."""


def left():
    """Seconds left of the test's timeout."""
    return DEADLINE - time.monotonic()


def call(method, url, body=None, headers=None):
    """(status, JSON answer) of one request, tried again until the deadline when the
    connection fails. Each try waits at most the time left. Retrying is safe: a read changes
    nothing, and the write carries an Idempotency-Key (a write the API did receive is answered
    again, not applied twice)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    failure = None  # the last try's connection failure
    while True:
        wait = left()
        if wait <= 0 and failure is not None:
            raise Failed(f"{method} {url}: unreachable: {failure}")
        if wait <= 0:
            raise Failed(f"{method} {url}: no answer within the test's timeout ({TIMEOUT:g} s)")
        try:
            with urllib.request.urlopen(request, timeout=wait) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:300]
            raise Failed(f"{method} {url}: HTTP {exc.code}: {text}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            failure = exc
            time.sleep(min(1.0, max(left(), 0)))
            continue
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            text = raw.decode(errors="replace")[:200]
            raise Failed(f"{method} {url}: HTTP {status} with no JSON: {text!r}") from None


def write(key, value):
    """Write ``key`` and return the write's position."""
    headers = {"content-type": "application/json", "idempotency-key": f"{key}-write"}
    if TOKEN:
        headers["authorization"] = f"Bearer {TOKEN}"
    _, answer = call("POST", f"{WRITE_URL}/write", {"key": key, "value": value}, headers)
    if not (isinstance(answer, dict) and answer.get("success") and answer.get("position")):
        raise Failed(f"write of {key} not acknowledged: {str(answer)[:300]}")
    try:
        return int(answer["position"])
    except (TypeError, ValueError):
        raise Failed(f"write of {key}: position {answer['position']!r} is no number") from None


# Of the time left, what a read's answer gets to come back after the server's wait ends.
ANSWER_MARGIN = 2.0


def read_back(key, value, position):
    """Read ``key`` at ``position`` until the read model has it, within the deadline."""
    path = f"{READ_URL}/read/{urllib.parse.quote(key, safe='')}"
    answer = None
    while True:
        if answer is not None and left() < ANSWER_MARGIN:
            # No time for a try whose answer could still come back: say what the last said
            # (a try cut short by the deadline would report a slow answer as "unreachable").
            raise Failed(
                f"the read model did not reach position {position} within the test's "
                f"timeout (is the projector running?); last answer: {answer}"
            )
        # The server's wait ends before the time left does, so its answer comes in time.
        wait = max(min(READ_WAIT, left() - ANSWER_MARGIN), 0)
        query = urllib.parse.urlencode({"position": position, "timeout": f"{wait:.1f}"})
        _, answer = call("GET", f"{path}?{query}")
        if isinstance(answer, dict) and answer.get("position_reached"):
            if answer.get("success") and answer.get("value") == value:
                return
            raise Failed(f"read of {key} at position {position} answered {answer}")


def main():
    key = f"helm-test-{secrets.token_hex(6)}"
    value = secrets.token_hex(8)
    try:
        position = write(key, value)
        read_back(key, value, position)
    except Failed as exc:
        print(f"helm test FAILED: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # any other bad answer: one line, no traceback, no token
        print(f"helm test FAILED: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"helm test passed: wrote {key} (position {position}) and read it back")
    return 0


if __name__ == "__main__":
    sys.exit(main())

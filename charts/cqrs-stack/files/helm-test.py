"""`helm test`: write a key through the release's write API, read it back through its read API.

Runs in the release's own stack image with the standard library only. Environment:
WRITE_URL, READ_URL (the Services), WRITE_API_TOKEN (optional: the write token),
TEST_TIMEOUT (seconds for the whole test, default 60). Exit 0 when the value read back at the
write's position is the value written; else exit 1 with what went wrong on stderr. The token
is never printed.
"""

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
DEADLINE = time.monotonic() + float(os.environ.get("TEST_TIMEOUT", "60"))
READ_WAIT = 10.0  # the read API's wait for a position, per try (at most 60)


class Failed(Exception):
    """What the test found wrong, said to whoever runs `helm test`."""


def call(method, url, body=None, headers=None):
    """(status, JSON answer) of one request; connection failures are retried to the deadline."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    while True:
        left = DEADLINE - time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=max(left, 1) + READ_WAIT) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:300]
            raise Failed(f"{method} {url}: HTTP {exc.code}: {text}") from None
        except (urllib.error.URLError, OSError) as exc:
            if left <= 0:
                raise Failed(f"{method} {url}: unreachable: {exc}") from None
        time.sleep(1)


def write(key, value):
    """Write ``key`` and return the write's position."""
    headers = {"content-type": "application/json"}
    if TOKEN:
        headers["authorization"] = f"Bearer {TOKEN}"
    _, answer = call("POST", f"{WRITE_URL}/write", {"key": key, "value": value}, headers)
    if not (isinstance(answer, dict) and answer.get("success") and answer.get("position")):
        raise Failed(f"write of {key} not acknowledged: {answer}")
    return int(answer["position"])


def read_back(key, value, position):
    """Read ``key`` at ``position`` until the read model has it, within the deadline."""
    query = urllib.parse.urlencode({"position": position, "timeout": READ_WAIT})
    url = f"{READ_URL}/read/{urllib.parse.quote(key, safe='')}?{query}"
    while True:
        _, answer = call("GET", url)
        if isinstance(answer, dict) and answer.get("position_reached"):
            if answer.get("success") and answer.get("value") == value:
                return
            raise Failed(f"read of {key} at position {position} answered {answer}")
        if time.monotonic() >= DEADLINE:
            raise Failed(
                f"the read model did not reach position {position} within the test's "
                f"timeout (is the projector running?); last answer: {answer}"
            )


def main():
    key = f"helm-test-{secrets.token_hex(6)}"
    value = secrets.token_hex(8)
    try:
        position = write(key, value)
        read_back(key, value, position)
    except Failed as exc:
        print(f"helm test FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"helm test passed: wrote {key} (position {position}) and read it back")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reference load generator: ``wrk`` (C, epoll), where it is installed (Debian ``wrk``).

Our asyncio client (``load.py``) spends a share of the same two cores as the servers it
measures; wrk spends a fraction of it, so the server's own limit shows. A Lua script builds the
requests (spread keys, POST bodies) and prints the figures as one JSON line at the end.

wrk stops at its deadline with requests in flight: the server may answer (and count) up to one
per connection that wrk does not. Phases that check exact counts (``read_count``) therefore
use the asyncio client, which finishes what it sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from .load import LoadResult

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "seconds": %f, "non2xx": %d, "errors": %d, '
    .. '"p50": %f, "p90": %f, "p99": %f, "max": %f}\n',
    summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e6, latency:percentile(90) / 1e6,
    latency:percentile(99) / 1e6, latency.max / 1e6))
end
"""

_WRITE = r"""
math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
local space = %(space)d
local value = string.rep("v", 64)
local headers = {["Content-Type"] = "application/json"}
request = function()
  local key = string.format("%(key_format)s", math.random(0, space - 1))
  local body = '{"key":"' .. key .. '","value":"' .. value .. '"}'
  return wrk.format("POST", "/write", headers, body)
end
"""

_READ = r"""
math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
local paths = {}
for line in io.lines("%(keys)s") do paths[#paths + 1] = "/read/" .. line end
request = function()
  return wrk.format("GET", paths[math.random(1, #paths)])
end
"""

_GET = r"""
local req = wrk.format("GET", "%(path)s")
request = function() return req end
"""


class WrkResult(LoadResult):
    """A ``LoadResult`` whose percentiles come from wrk's histogram (no per-request list)."""

    def __init__(self, figures: dict[str, float]) -> None:
        super().__init__(
            requests=int(figures["requests"]),
            errors=int(figures["non2xx"] + figures["errors"]),
            seconds=float(figures["seconds"]),
        )
        self.p50, self.p90, self.p99, self.max = (
            figures["p50"],
            figures["p90"],
            figures["p99"],
            figures["max"],
        )


def binary() -> str | None:
    """The wrk executable, or None when it is not installed."""
    return shutil.which("wrk")


def run(
    port: int,
    clients: int,
    seconds: float,
    script: str,
    threads: int = 2,
) -> WrkResult:
    """Run wrk against 127.0.0.1:port with ``script`` (Lua) for ``seconds``; its figures."""
    exe = binary()
    assert exe is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script + _DONE)
    try:
        done = subprocess.run(
            [
                exe,
                "-t",
                str(min(threads, clients)),
                "-c",
                str(clients),
                "-d",
                f"{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                handle.name,
                f"http://127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        Path(handle.name).unlink(missing_ok=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRKJSON "))
    return WrkResult(json.loads(line[len("WRKJSON ") :]))


def get(port: int, clients: int, seconds: float, path: str) -> WrkResult:
    """GET ``path`` in a closed loop."""
    return run(port, clients, seconds, _GET % {"path": path})


def writes(
    port: int, clients: int, seconds: float, key_space: int, key_format: str = "user:%d"
) -> WrkResult:
    """POST /write of a random key of ``key_space`` (``key_format`` % its number; printf-style,
    as Lua's string.format takes it) with a 64-byte value."""
    return run(port, clients, seconds, _WRITE % {"space": key_space, "key_format": key_format})


def reads(port: int, clients: int, seconds: float, keys: list[str]) -> WrkResult:
    """GET /read/{key} of a random key of ``keys`` (spread)."""
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as handle:
        handle.write("\n".join(keys) + "\n")
    try:
        return run(port, clients, seconds, _READ % {"keys": handle.name})
    finally:
        Path(handle.name).unlink(missing_ok=True)

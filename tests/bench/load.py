"""Our own load generator: raw HTTP/1.1 keep-alive connections on asyncio (uvloop if present).

A raw client costs a fraction of httpx's CPU, which matters when the load generator shares two
cores with the servers it measures. Every loop is bounded by a deadline and a request cap.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Request = tuple[str, str, bytes]  # method, path, body


class HttpConnection:
    """One keep-alive connection to 127.0.0.1:port; one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect."""
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and return (status, body); the server must send Content-Length."""
        if self._writer is None or self._reader is None:
            await self.open()
        assert self._writer is not None and self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        return status, await self._reader.readexactly(length) if length else b""

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class LoadResult:
    """What one bounded load phase measured."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, nearest rank; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def closed_loop(
    port: int,
    clients: int,
    seconds: float,
    make: Callable[[int, int], Request],
    *,
    max_requests: int = 10_000_000,
    ok: Callable[[int, bytes], bool] = lambda status, body: status == 200,
    keep_bodies: bool = False,
) -> LoadResult:
    """``clients`` connections each send the next request as soon as the last is answered.

    Stops issuing at ``seconds`` or after ``max_requests`` in total; in-flight requests finish.
    """
    result = LoadResult()
    issued = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def client(number: int) -> None:
        nonlocal issued
        conn = HttpConnection(port)
        await conn.open()
        i = 0
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                method, path, body = make(number, i)
                i += 1
                t0 = time.perf_counter()
                try:
                    status, answer = await conn.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, answer = 0, b""
                    await conn.close()
                result.latencies.append(time.perf_counter() - t0)
                result.requests += 1
                if not ok(status, answer):
                    result.errors += 1
                if keep_bodies:
                    result.bodies.append(answer)
        finally:
            await conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(clients))), seconds + 60)
    result.seconds = time.perf_counter() - started
    return result


async def open_loop_writes(
    port: int,
    rate: float,
    seconds: float,
    make: Callable[[int], Request],
    on_ack: Callable[[int, float], None],
    connections: int = 64,
) -> LoadResult:
    """Send writes at a fixed ``rate`` (not waiting for answers) for ``seconds``.

    ``on_ack(position, acked_at)`` is called as each write is answered. Requests are spread
    over a pool of connections; if all are busy a request waits (and the delay is counted).
    """
    result = LoadResult()
    pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(connections):
        conn = HttpConnection(port)
        await conn.open()
        pool.put_nowait(conn)
    started = time.perf_counter()
    total = int(rate * seconds)
    tasks = []

    async def send(number: int, due: float) -> None:
        conn = await pool.get()
        try:
            method, path, body = make(number)
            status, answer = await conn.request(method, path, body)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, answer = 0, b""
        finally:
            pool.put_nowait(conn)
        acked = time.perf_counter()
        result.latencies.append(acked - due)
        result.requests += 1
        if status != 200:
            result.errors += 1
            return
        on_ack(int(json.loads(answer)["position"]), acked)

    for number in range(total):
        due = started + number / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(number, due)))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    result.seconds = time.perf_counter() - started
    while not pool.empty():
        await pool.get_nowait().close()
    return result

"""Steady write and read traffic, and the tally of what the stack acknowledged.

Writes go at a fixed rate over a pool of keys (POST for a new key, PUT afterwards). Only a
200 counts as acknowledged; a 503 or a transport error means the write was not acknowledged
(it may or may not be in the write DB: the invariants only rely on acknowledged ones).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx


@dataclass
class Tally:
    """What the load saw."""

    acknowledged: dict[int, tuple[str, str]] = field(default_factory=dict)  # position → write
    queued: int = 0  # acknowledged while Redis was down (event queued, published later)
    write_failures: Counter[str] = field(default_factory=Counter)
    reads: Counter[str] = field(default_factory=Counter)
    read_your_writes_missed: int = 0  # ?position= answers with position_reached false
    server_errors: list[str] = field(default_factory=list)  # any 5xx but 503: a bug

    @property
    def writes_failed(self) -> int:
        """Writes that were not acknowledged."""
        return sum(self.write_failures.values())


def _key_path(key: str) -> str:
    return "/read/" + quote(key, safe="")


class Load:
    """Writers and readers at a steady rate until ``stop`` is set."""

    def __init__(
        self, write_url: str, read_url: str, writes_per_second: float, reads_per_second: float
    ) -> None:
        self.write_url = write_url
        self.read_url = read_url
        self.writes_per_second = writes_per_second
        self.reads_per_second = reads_per_second
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.keys = [f"soak:{n:04d}" for n in range(500)]
        self.written: set[str] = set()
        self.random = random.Random(20240601)

    async def run(self) -> None:
        """Drive traffic until ``stop``; returns once every request in flight has ended."""
        limits = httpx.Limits(max_connections=64)
        timeout = httpx.Timeout(10.0)
        async with (
            httpx.AsyncClient(base_url=self.write_url, timeout=timeout, limits=limits) as writer,
            httpx.AsyncClient(base_url=self.read_url, timeout=timeout, limits=limits) as reader,
        ):
            await asyncio.gather(
                self._paced(self.writes_per_second, lambda n: self._write(writer, n)),
                self._paced(self.reads_per_second, lambda n: self._read(reader)),
            )

    async def _paced(self, rate: float, send) -> None:  # type: ignore[no-untyped-def]
        """Start one request every 1/rate seconds; at most 64 in flight (the rest are skipped)."""
        in_flight: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        number = 0
        while not self.stop.is_set():
            number += 1
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            if len(in_flight) >= 64:
                continue  # the stack is stalled: do not pile up requests without bound
            task = asyncio.create_task(send(number))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _write(self, client: httpx.AsyncClient, number: int) -> None:
        key = self.random.choice(self.keys)
        value = f"{key}#{number}"
        method = "PUT" if key in self.written else "POST"
        try:
            answer = await client.request(method, "/write", json={"key": key, "value": value})
        except httpx.HTTPError as exc:
            self.tally.write_failures[type(exc).__name__] += 1
            return
        if answer.status_code != 200:
            self.tally.write_failures[f"HTTP {answer.status_code}"] += 1
            if answer.status_code >= 500 and answer.status_code != 503:
                self.tally.server_errors.append(
                    f"{method} /write {answer.status_code} {answer.text[:200]}"
                )
            return
        body = answer.json()
        if body.get("key") != key or not isinstance(body.get("position"), int):
            self.tally.server_errors.append(f"bad write answer {body}")
            return
        self.tally.acknowledged[body["position"]] = (key, value)
        self.tally.queued += bool(body.get("queued"))
        self.written.add(key)

    async def _read(self, client: httpx.AsyncClient) -> None:
        if not self.tally.acknowledged:
            return
        # Half the reads ask for read-your-writes on a recent acknowledged position.
        position = max(self.tally.acknowledged) if self.random.random() < 0.5 else None
        key = self.tally.acknowledged[position][0] if position else self.random.choice(self.keys)
        params = {"position": position, "timeout": 2} if position else None
        try:
            answer = await client.get(_key_path(key), params=params)
        except httpx.HTTPError as exc:
            self.tally.reads[type(exc).__name__] += 1
            return
        if answer.status_code != 200:
            self.tally.reads[f"HTTP {answer.status_code}"] += 1
            if answer.status_code >= 500 and answer.status_code != 503:
                self.tally.server_errors.append(
                    f"GET /read {answer.status_code} {answer.text[:200]}"
                )
            return
        body = answer.json()
        self.tally.reads["found" if body["success"] else "not found"] += 1
        if position and body.get("position_reached") is False:
            self.tally.read_your_writes_missed += 1
        elif position and not body["success"]:
            self.tally.server_errors.append(f"position {position} reached but {key!r} not found")

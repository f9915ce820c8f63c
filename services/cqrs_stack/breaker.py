"""A circuit breaker: stop waiting on a dependency that timed out, probe it in the background.

Closed, callers use the dependency. After a failure the breaker opens: callers skip the
dependency at once (the write path queues the event instead of waiting a socket timeout per
batch). While open, one probe at a time runs in the background every ``probe_interval``
seconds (the half-open state); the first probe that succeeds closes the breaker again. No
caller ever waits for a probe. A dependency that answers probes but fails real calls (a PING
answered, an XADD hung) would cost one timeout per probe interval: each time a real call fails
right after a probe closed the breaker, the interval doubles (up to ``_MAX_BACKOFF`` times),
and a real call that succeeds resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_MAX_BACKOFF = 32


class CircuitBreaker:
    """Closed, open or half-open (a probe in flight) for one dependency named ``name``."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], Awaitable[object]],
        *,
        probe_timeout: float,
        probe_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._probe = probe
        self._probe_timeout = probe_timeout
        self._probe_interval = probe_interval
        self._clock = clock
        self._opened_at: float | None = None  # None: closed
        self._interval = probe_interval  # grows while probes succeed and real calls fail
        self._closed_by_probe = False
        self._probing: asyncio.Task[None] | None = None  # probes while open
        self._due = asyncio.Event()  # set by a caller that finds a probe due

    @property
    def closed(self) -> bool:
        """Is the dependency to be used (no failure since the last success)?"""
        return self._opened_at is None

    def allows(self) -> bool:
        """Should a caller use the dependency now? A probe that is due runs at once."""
        if self._opened_at is None:
            return True
        if self._clock() - self._opened_at >= self._interval:
            self._due.set()  # the background probe's wait ends now (a clock that jumped)
        return False

    def failed(self, error: BaseException) -> None:
        """A call failed or timed out: open (or keep open) and restart the probe interval.

        While open, a background task probes every interval until a probe succeeds (or
        ``close``), so the breaker closes when the dependency is back even if no call comes.
        """
        if self._opened_at is None:
            if self._closed_by_probe:
                self._interval = min(self._interval * 2, self._probe_interval * _MAX_BACKOFF)
            log.warning(
                "circuit opened dependency=%s error=%r next_probe_s=%.1f",
                self.name,
                error,
                self._interval,
            )
        self._closed_by_probe = False
        self._opened_at = self._clock()
        if self._probing is None or self._probing.done():
            self._probing = asyncio.create_task(self._probe_while_open(), name=f"{self.name}-probe")

    def succeeded(self) -> None:
        """A real call succeeded: close, and probe at the base interval next time."""
        self._close()
        self._interval = self._probe_interval

    def _close(self) -> None:
        if self._opened_at is not None:
            log.info("circuit closed dependency=%s", self.name)
        self._opened_at = None

    async def close(self) -> None:
        """Cancel a probe in flight (at shutdown)."""
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing

    async def _probe_while_open(self) -> None:
        # Ends when a probe closes the breaker; each turn waits an interval or a probe timeout.
        while self._opened_at is not None:
            wait = self._opened_at + self._interval - self._clock()
            if wait > 0:
                self._due.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._due.wait(), wait)
                if self._clock() - self._opened_at < self._interval and not self._due.is_set():
                    continue
            try:
                await asyncio.wait_for(self._probe(), self._probe_timeout)
            except Exception:  # a probe reports through the state, it never raises
                self._opened_at = self._clock()  # still open: the next probe one interval on
            else:
                self._close()
                self._closed_by_probe = True

"""The circuit breaker's states: closed, open (no waiting), half-open (one background probe).

Time is a fake clock that the tests move, so that the states do not depend on the machine's
load; each probe runs as the background task it is.
"""

from __future__ import annotations

import asyncio

from cqrs_stack.breaker import CircuitBreaker


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def probed(breaker: CircuitBreaker) -> bool:
    """Ask the breaker (which may wake a due probe), let a probe run; is it closed now?"""
    allowed = breaker.allows()
    for _ in range(20):  # the probe task's steps
        await asyncio.sleep(0)
    return allowed or breaker.closed


async def test_open_until_a_background_probe_succeeds() -> None:
    answers = [False, True]  # the first probe fails, the second succeeds
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        if not answers.pop(0):
            raise OSError("no answer")

    clock = Clock()
    breaker = CircuitBreaker("dep", probe, probe_timeout=1.0, probe_interval=1.0, clock=clock)
    assert breaker.allows()
    breaker.failed(TimeoutError())
    clock.now = 0.9
    assert not await probed(breaker) and probes == 0  # open: callers skip, no probe yet
    clock.now = 1.0
    assert not breaker.allows()  # the probe runs in the background; this caller skips
    assert not await probed(breaker) and probes == 1  # it failed: open, next one at 2.0
    clock.now = 1.9
    assert not await probed(breaker) and probes == 1
    clock.now = 2.0
    assert await probed(breaker) and probes == 2
    assert breaker.allows()
    await breaker.close()


async def test_a_probe_that_hangs_is_cut_at_its_timeout() -> None:
    async def hangs() -> None:
        await asyncio.sleep(60)

    clock = Clock()
    breaker = CircuitBreaker("dep", hangs, probe_timeout=0.05, probe_interval=1.0, clock=clock)
    breaker.failed(TimeoutError())
    clock.now = 1.0
    assert not breaker.allows()
    await asyncio.sleep(0.2)  # past the probe's (real) timeout
    assert not breaker.closed
    await breaker.close()


async def test_real_calls_failing_after_probes_succeed_back_off() -> None:
    async def answers() -> None:
        return None

    clock = Clock()
    breaker = CircuitBreaker("dep", answers, probe_timeout=1.0, probe_interval=1.0, clock=clock)
    breaker.failed(TimeoutError())
    for interval in (1.0, 2.0, 4.0):  # doubles each time a real call fails after a probe
        opened = clock.now
        clock.now = opened + interval - 0.1
        assert not await probed(breaker)
        clock.now = opened + interval
        assert await probed(breaker)  # the probe answered: closed
        breaker.failed(TimeoutError())  # and the real call failed again
    breaker.succeeded()  # a real call succeeds: back to the base interval
    breaker.failed(TimeoutError())
    clock.now += 1.0
    assert await probed(breaker)
    await breaker.close()

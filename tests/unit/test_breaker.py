"""The circuit breaker's states: closed, open (no waiting), half-open (one background probe)."""

from __future__ import annotations

import asyncio

from cqrs_stack.breaker import CircuitBreaker


async def test_open_until_a_background_probe_succeeds() -> None:
    answers: list[bool] = [False, True]  # the first probe fails, the second succeeds
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        if not answers.pop(0):
            raise OSError("no answer")

    breaker = CircuitBreaker("dep", probe, probe_timeout=1.0, probe_interval=0.05)
    assert breaker.allows()
    breaker.failed(TimeoutError())
    assert not breaker.allows() and probes == 0  # open: no caller waits, no probe yet
    for expected_probes in (1, 2):
        await asyncio.sleep(0.06)
        assert not breaker.allows()  # a probe starts in the background; callers still skip
        await asyncio.sleep(0.01)
        assert probes == expected_probes
    assert breaker.closed and breaker.allows()
    await breaker.close()


async def test_a_probe_that_hangs_is_cut_at_its_timeout() -> None:
    async def hangs() -> None:
        await asyncio.sleep(60)

    breaker = CircuitBreaker("dep", hangs, probe_timeout=0.05, probe_interval=0.01)
    breaker.failed(TimeoutError())
    await asyncio.sleep(0.02)
    assert not breaker.allows()
    await asyncio.sleep(0.1)
    assert not breaker.closed  # the probe timed out: still open, the next probe comes later
    await breaker.close()

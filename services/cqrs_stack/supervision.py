"""Background work that never dies in silence: back-off, supervised loops and a watchdog.

Every background task of a process (the projector's stream consumer and write-DB sweep, the
write API's command writer and publisher, the read API's read-count flusher) is a loop of
rounds run by ``Supervisor.run``. A round that raises is logged, reported by /ready until a
later round succeeds, and retried after an exponential back-off, so a failure the code did not
foresee (a pool timeout, a surprising row) is waited out like an outage. A loop that ends
while its process is not stopping (it was cancelled, or the supervisor itself failed) is fatal:
the watchdog makes the process stop and exit non-zero, so that its own supervisor (Kubernetes,
systemd) restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What a process exits with after a background task ended unexpectedly (EX_SOFTWARE).
EXIT_TASK_DIED = 70

_fatal_reason: str | None = None
_stop_hook: Callable[[], None] | None = None


class Backoff:
    """Exponential back-off: ``initial``, doubled after every failure, at most ``maximum``."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self._next = initial

    def next_delay(self) -> float:
        """The delay to wait after this failure (the next one will be twice as long)."""
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        """A success: the next failure waits ``initial`` again."""
        self._next = self.initial


class RoundFailed(Exception):
    """Raised by a round that has handled a failure (logged it, chose its back-off) and must
    still report it: the task's health counts it (/ready), and the loop waits ``retry_in``."""

    def __init__(self, error: BaseException, retry_in: float) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.retry_in = retry_in


@dataclass
class TaskHealth:
    """How a supervised loop is doing, as /ready reports it."""

    name: str
    # Does the process's work need this task? Then its failures make the process unready;
    # otherwise they are reported only, and just its end does.
    essential: bool = True
    failures: int = 0  # rounds failed in a row
    last_error: str = ""
    stopped: bool = False

    def check(self) -> str:
        """ "ok", or what is wrong: the task ended, or its last rounds failed."""
        if self.stopped:
            return "error: stopped"
        if self.failures:
            return (
                f"error: {self.failures} failed rounds in a row, retrying; last: {self.last_error}"
            )
        return "ok"

    def decides_readiness(self) -> bool:
        """Does this task's check count for /ready's status?"""
        return self.essential or self.stopped


# A round returns how long to wait before the next one (None: the loop's interval). Expected
# outages (Redis down for the publisher) are handled inside the round; anything it raises is
# a failure of the task (RoundFailed: one the round handled, reported all the same).
Round = Callable[[], Awaitable[float | None]]


class Supervisor:
    """Runs the background loops of one process and watches over them."""

    def __init__(
        self,
        *,
        retry_max_delay: float = 5.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.retry_max_delay = retry_max_delay
        self._on_fatal = on_fatal or exit_process
        self.health: dict[str, TaskHealth] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def run(
        self,
        name: str,
        round_: Round,
        *,
        until: asyncio.Event,
        interval: float,
        first_after: float = 0.0,
        essential: bool = True,
    ) -> None:
        """Start the loop ``name``: ``round_`` every ``interval`` seconds until ``until`` is set.

        The first round runs ``first_after`` seconds from now. The round in progress when
        ``until`` is set is finished, not cancelled; ``stop`` bounds how long that may take.
        A task that is not ``essential`` (the process serves requests without it) is reported
        on /ready when it fails, but makes the process unready only if it ends.
        """
        if name in self.tasks:
            raise ValueError(f"a background task named {name} is already running")
        health = TaskHealth(name, essential)
        self.health[name] = health
        task = asyncio.create_task(
            self._loop(health, round_, until, interval, first_after), name=name
        )
        task.add_done_callback(lambda done: self._watch(health, done, until))
        self.tasks[name] = task

    def checks(self) -> dict[str, str]:
        """Each task's readiness check: "ok" or the error."""
        return {name: health.check() for name, health in self.health.items()}

    def required_checks(self) -> set[str]:
        """The tasks whose checks decide readiness now."""
        return {name for name, health in self.health.items() if health.decides_readiness()}

    async def stop(self, names: list[str] | None, within: float) -> None:
        """Wait, at most ``within`` seconds, for loops (all if None) to end; cancel the rest.

        Their ``until`` events must already be set: a loop ends after its current round.
        """
        tasks = [t for n, t in self.tasks.items() if names is None or n in names]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=within)
        for task in late:
            log.error("background task did not finish in time, cancelled task=%s", task.get_name())
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=within)

    async def _loop(
        self,
        health: TaskHealth,
        round_: Round,
        until: asyncio.Event,
        interval: float,
        first_after: float,
    ) -> None:
        backoff = Backoff(min(0.1, interval) or 0.1, max(self.retry_max_delay, interval))
        if first_after > 0:
            await wait_or_stop(until, first_after)
        while not until.is_set():
            try:
                delay = await round_()
            except RoundFailed as exc:  # logged by the round, which chose its wait
                health.failures += 1
                health.last_error = str(exc)[:300]
                delay = exc.retry_in
            except Exception as exc:  # any failure of a round: reported, then retried
                health.failures += 1
                health.last_error = f"{type(exc).__name__}: {exc}"[:300]
                delay = backoff.next_delay()
                log.error(
                    "background task failed, retrying in %.2fs task=%s failures=%d error=%s",
                    delay,
                    health.name,
                    health.failures,
                    health.last_error,
                    exc_info=health.failures == 1,  # the traceback once per run of failures
                )
            else:
                if health.failures:
                    log.info(
                        "background task recovered task=%s after_failures=%d",
                        health.name,
                        health.failures,
                    )
                health.failures = 0
                backoff.reset()
                delay = interval if delay is None else delay
            if delay > 0:
                await wait_or_stop(until, delay)

    def _watch(self, health: TaskHealth, task: asyncio.Task[None], until: asyncio.Event) -> None:
        health.stopped = True
        failure = None if task.cancelled() else task.exception()
        if until.is_set():  # a stop that was asked for
            if failure is not None:
                log.error(
                    "background task failed while stopping task=%s error=%r", health.name, failure
                )
            return
        error = "cancelled" if task.cancelled() else repr(failure) if failure else "returned"
        reason = f"background task {health.name} ended unexpectedly: {error}"
        log.critical("%s", reason)
        self._on_fatal(reason)


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


def set_stop_hook(hook: Callable[[], None]) -> None:
    """How ``exit_process`` starts a graceful stop: the server registers its own."""
    global _stop_hook
    _stop_hook = hook


def exit_process(reason: str, grace_seconds: float = 60.0) -> None:
    """Stop this process gracefully and make it exit non-zero (``EXIT_TASK_DIED``).

    The stop hook (else SIGTERM) runs the server's usual drain; ``exit_status`` then tells the
    command to fail. If the drain does not end within ``grace_seconds``, the process is ended
    hard with the same status.
    """
    global _fatal_reason
    if _fatal_reason is not None:
        return
    _fatal_reason = reason
    timer = threading.Timer(grace_seconds, os._exit, (EXIT_TASK_DIED,))
    timer.daemon = True
    timer.start()
    if _stop_hook is not None:
        _stop_hook()
    else:
        signal.raise_signal(signal.SIGTERM)


def exit_status() -> int:
    """0, or ``EXIT_TASK_DIED`` once a background task ended unexpectedly."""
    return 0 if _fatal_reason is None else EXIT_TASK_DIED

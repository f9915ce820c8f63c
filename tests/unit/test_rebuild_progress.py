"""The figures of a rebuild run's progress record, and the bar ``cqrs-stack rebuild`` draws
from it."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from cqrs_stack.cli import ProgressBar
from cqrs_stack.rebuild_progress import RunProgress

START = datetime(2026, 1, 1, tzinfo=UTC)


def run(phase: str, done: int, total: int, seconds: float) -> RunProgress:
    """A run that has counted ``done`` of ``total`` ``seconds`` after it started."""
    at = START + timedelta(seconds=seconds)
    return RunProgress("r", ("records",), 2, phase, done, total, START, at, None, None)


def test_percent_rate_and_eta_follow_the_record() -> None:
    working = run("load", 250_000, 1_000_000, 2.0)
    assert working.percent == 25.0
    assert working.rate == 125_000.0
    assert working.eta_seconds == 6.0  # 750,000 left at 125,000/s


def test_figures_at_their_bounds() -> None:
    assert run("load", 0, 0, 0.0).percent == 0.0  # nothing known yet
    assert run("load", 0, 10, 5.0).rate is None and run("load", 0, 10, 5.0).eta_seconds is None
    assert run("load", 10, 10, 0.0).rate is None  # no time elapsed: no rate yet
    # Catch-up may find more than the total first known: never over 100 %, never negative.
    over = run("catch-up", 12, 10, 1.0)
    assert over.percent == 100.0 and over.eta_seconds == 0.0
    assert run("done", 0, 0, 1.0).percent == 100.0  # an empty write DB is done
    failed = run("failed", 5, 10, 1.0)
    assert failed.finished and failed.eta_seconds == 0.0 and failed.percent == 50.0


def test_the_bar_shows_phase_percent_rate_and_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    bar.show(run("load", 250_000, 1_000_000, 2.0))
    bar.show(run("load", 250_000, 1_000_000, 2.5))  # same phase and percent: not repeated
    bar.show(run("done", 1_000_000, 1_000_000, 8.0))
    lines = out.getvalue().splitlines()
    assert lines == [
        "load      [##........]  25% 250000/1000000 125,000/s ETA 6s",
        "done      [##########] 100% 1000000/1000000 125,000/s",
    ]

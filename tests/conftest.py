"""Fixtures shared by every test level: real servers, stacks and a real API server.

They live in tests/fixtures/ (and the operator's in tests/operator/fixtures_operator.py) and are
registered here once, so every level uses the same one fixture per server.
"""

from __future__ import annotations

import signal
from types import FrameType

import pytest

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.stack",
    "tests.fixtures.kube",
    "tests.operator.fixtures_operator",
]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI runner's cancel, `.ci/run` stopping a stage) ends the run as a Ctrl-C
    does, so that every fixture tears its servers down: they run in sessions of their own
    (a terminal's Ctrl-C must not reach them) and would outlive a pytest killed outright."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)

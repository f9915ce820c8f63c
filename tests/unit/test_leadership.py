"""The operator's leader election flags: timings that could let two leaders overlap are refused."""

from __future__ import annotations

import pytest

from cqrs_operator.__main__ import parse_args
from cqrs_operator.leadership import ElectionConfig

BASE = ["--namespace", "shop", "--leader-elect", "--leader-election-namespace", "ops"]


def test_defaults_are_client_gos() -> None:
    args = parse_args(BASE)
    assert (args.election.lease_duration, args.election.renew_deadline) == (15, 10.0)
    assert args.election.retry_period == 2.0
    assert args.election.namespace == "ops"
    # A restarted container is a new candidate: the identity has a random part.
    assert parse_args(BASE).election.identity != args.election.identity


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lease-duration=10", "--renew-deadline=10"], "shorter than the lease duration"),
        (["--renew-deadline=2", "--retry-period=2"], "retry period"),
        (["--retry-period=0"], "retry period"),
        (["--lease-duration=0", "--renew-deadline=0.5"], "not within 1..3600"),
    ],
)
def test_overlapping_timings_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    assert message in capsys.readouterr().err


def test_the_bounds_themselves_are_accepted() -> None:
    # renew deadline just under the lease duration; retry period just leaves room (x1.2).
    assert ElectionConfig("ns", "l", "me", 10, 9.99, 8.3).problem() is None
    assert ElectionConfig("ns", "l", "me", 10, 9.99, 8.4).problem() is not None


def test_without_a_namespace_election_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("CQRS_OPERATOR_LEASE_NAMESPACE", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--namespace", "shop", "--leader-elect"])
    assert "--leader-election-namespace" in capsys.readouterr().err

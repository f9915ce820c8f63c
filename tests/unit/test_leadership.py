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


@pytest.mark.parametrize(
    ("variable", "flag"),
    [
        ("CQRS_OPERATOR_LEASE_DURATION", "--lease-duration"),
        ("CQRS_OPERATOR_RENEW_DEADLINE", "--renew-deadline"),
        ("CQRS_OPERATOR_RETRY_PERIOD", "--retry-period"),
    ],
)
def test_a_timing_from_the_environment_that_is_no_number_is_a_usage_error(
    variable: str, flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, "15s")
    with pytest.raises(SystemExit) as stopped:
        parse_args(BASE)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "'15s'" in err and "Traceback" not in err


def test_timings_from_the_environment_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_OPERATOR_LEASE_DURATION", "20")
    monkeypatch.setenv("CQRS_OPERATOR_RENEW_DEADLINE", "12.5")
    election = parse_args(BASE).election
    assert (election.lease_duration, election.renew_deadline) == (20, 12.5)


@pytest.mark.parametrize("flag", ["--lease-duration", "--renew-deadline", "--retry-period"])
def test_a_timing_flag_that_is_no_number_is_a_usage_error(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args([*BASE, f"{flag}=2m"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid" in err and "'2m'" in err and "Traceback" not in err


def test_each_timing_flag_names_its_default_and_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default, variable in [
        ("15", "CQRS_OPERATOR_LEASE_DURATION"),
        ("10", "CQRS_OPERATOR_RENEW_DEADLINE"),
        ("2", "CQRS_OPERATOR_RETRY_PERIOD"),
    ]:
        assert f"({default}; ${variable})" in text

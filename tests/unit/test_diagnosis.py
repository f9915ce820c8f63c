"""The verdict of a health reading (pure): bounds, causes, progress over two readings, and the
operator's conditions from it."""

from __future__ import annotations

from cqrs_operator import status
from cqrs_stack.diagnosis import (
    Bounds,
    CatchUpHealth,
    ConsumerHealth,
    PendingEntry,
    PinningTransaction,
    StreamHealth,
    entry_age,
    judge,
    progress_since,
    stopped,
)

BOUNDS = Bounds(lag_target=30.0, stopped_after=10.0, catchup_interval=2.0)
OLDEST = PendingEntry("1000-0", 40.0, "p-1", 2)


def _stream(idle: float, pending: int = 3, undelivered: int = 0, lag: float = 1.0) -> StreamHealth:
    consumer = ConsumerHealth(
        "p-1", pending, idle, OLDEST if pending else None, stopped(idle, pending, 10.0)
    )
    return StreamHealth(
        reachable=True,
        group_exists=True,
        pending=pending,
        undelivered=undelivered,
        lag_seconds=lag,
        oldest_pending=OLDEST if pending else None,
        consumers=(consumer,),
        progress="acked:7",
    )


def test_a_consumer_idle_exactly_the_bound_still_reads_and_one_past_it_stopped() -> None:
    assert not stopped(10.0, 3, 10.0)
    assert stopped(10.001, 3, 10.0)
    assert not stopped(1000.0, 0, 10.0)  # holds nothing: merely a past consumer name
    at_bound = judge(_stream(idle=10.0), None, None, BOUNDS)
    assert at_bound.verdict == "ok", at_bound
    past = judge(_stream(idle=10.001), None, None, BOUNDS)
    assert (past.verdict, past.cause) == ("stalled", "NoConsumerReading")
    assert "'p-1' idle 10 s holding 3 pending" in past.reason
    assert "oldest pending 1000-0 (40 s old, consumer 'p-1', 2 deliveries)" in past.reason


def test_lag_at_the_target_is_ok_and_past_it_degraded() -> None:
    assert judge(_stream(idle=0.1, lag=30.0), None, None, BOUNDS).verdict == "ok"
    over = judge(_stream(idle=0.1, lag=30.5), None, None, BOUNDS)
    assert (over.verdict, over.cause) == ("degraded", "LagOverTarget")


def test_no_progress_over_two_readings_is_stalled_past_the_bound() -> None:
    health = _stream(idle=0.1)
    first, still = progress_since(None, health, now=100.0)
    assert first == {"marker": "acked:7", "since": 100.0} and still is None
    kept, still = progress_since(first, health, now=110.0)
    assert kept == first and still == 10.0
    assert judge(health, None, None, BOUNDS, still).verdict == "ok"  # at the bound
    _, still = progress_since(first, health, now=110.5)
    stuck = judge(health, None, None, BOUNDS, still)
    assert (stuck.verdict, stuck.cause) == ("stalled", "NoProgress")
    moved = StreamHealth(**{**_fields(health), "progress": "acked:8"})
    again, still = progress_since(first, moved, now=111.0)
    assert again == {"marker": "acked:8", "since": 111.0} and still is None
    idle = StreamHealth(reachable=True, group_exists=True, progress="acked:7")
    assert progress_since(first, idle, now=200.0) == ({"marker": "acked:7", "since": 200.0}, None)


def _fields(health: StreamHealth) -> dict[str, object]:
    return {name: getattr(health, name) for name in StreamHealth.__slots__}  # type: ignore[attr-defined]


def test_the_causes_in_order_of_what_matters() -> None:
    down = StreamHealth(reachable=False, error="ConnectionError")
    assert judge(down, None, None, BOUNDS).cause == "RedisUnreachable"
    refused = judge(_stream(idle=0.1), None, "InvalidPasswordError (SQLSTATE 28P01)", BOUNDS)
    assert (refused.verdict, refused.cause) == ("stalled", "ReadDbRefusing")
    pin = PinningTransaction(12345, 678, "psql", "idle in transaction", 312.0, 312.0, "SELECT")
    pinned = CatchUpHealth(available=True, watermark=12345, age_seconds=312.0, pinned_by=(pin,))
    verdict = judge(_stream(idle=0.1, pending=0), pinned, None, BOUNDS)
    assert (verdict.verdict, verdict.cause) == ("degraded", "WatermarkPinned")
    assert verdict.reason == (
        "catch-up watermark pinned by write-DB transaction 12345 (pid 678, app 'psql',"
        " idle in transaction for 312 s)"
    )
    young = CatchUpHealth(available=True, watermark=1, age_seconds=30.0, pinned_by=(pin,))
    assert judge(_stream(idle=0.1, pending=0), young, None, BOUNDS).verdict == "ok"


def test_entry_age_from_the_id_timestamp() -> None:
    assert entry_age("1000-5", now=4.5) == 3.5
    assert entry_age("9000-0", now=1.0) == 0.0  # a clock behind the server's: never negative


def test_operator_conditions_from_the_verdict() -> None:
    stuck = judge(_stream(idle=60.0), None, None, BOUNDS)
    stalled, degraded = status.projection_conditions(stuck)
    assert (stalled.type, stalled.status, stalled.reason) == (
        "ProjectionStalled",
        True,
        "NoConsumerReading",
    )
    assert stalled.message == stuck.reason
    assert (degraded.type, degraded.status, degraded.reason) == (
        "ProjectionDegraded",
        False,
        "Stalled",
    )
    fine = status.projection_conditions(judge(_stream(idle=0.1), None, None, BOUNDS))
    assert [(c.status, c.reason) for c in fine] == [(False, "Progressing"), (False, "KeepsUp")]
    unknown = status.projection_conditions(None, "RedisUnreachable: cannot read")
    assert [c.status_text for c in unknown] == ["Unknown", "Unknown"]
    merged = status.summary({}, [*fine], None)
    ready = {c["type"]: c for c in merged["conditions"]}["Ready"]
    assert ready["status"] == "False"  # the other parts missing here, not the projection
    assert "Projection" not in ready["message"]

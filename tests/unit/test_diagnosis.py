"""The verdict of a health reading (pure): bounds, causes, progress over two readings, and the
operator's conditions from it."""

from __future__ import annotations

import asyncio
import time

import pytest

from cqrs_operator import status
from cqrs_stack.diagnosis import (
    NO_ANSWER,
    Bounds,
    CatchUpHealth,
    ConsumerHealth,
    Diagnosis,
    GaugeRecorder,
    PendingEntry,
    PinningTransaction,
    StreamHealth,
    describe,
    entry_age,
    judge,
    progress_since,
    stopped,
    within,
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
    at_bound = judge(_stream(idle=10.0, lag=20.0), None, None, BOUNDS)
    assert at_bound.verdict == "ok", at_bound
    past = judge(_stream(idle=10.001, lag=20.0), None, None, BOUNDS)
    assert (past.verdict, past.cause) == ("stalled", "NoConsumerReading")
    assert "'p-1' idle 10 s holding 3 pending" in past.reason
    assert "oldest pending 1000-0 (40 s old, consumer 'p-1', 2 deliveries)" in past.reason


def test_work_waiting_exactly_the_bound_is_not_yet_stalled_and_one_past_it_is() -> None:
    """An entry only just added while every consumer is between reads is no sign yet."""
    young = judge(_stream(idle=60.0, pending=0, undelivered=2, lag=10.0), None, None, BOUNDS)
    assert young.verdict == "ok", young
    old = judge(_stream(idle=60.0, pending=0, undelivered=2, lag=10.001), None, None, BOUNDS)
    assert (old.verdict, old.cause) == ("stalled", "NoConsumerReading")


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
    stuck = judge(_stream(idle=60.0, lag=20.0), None, None, BOUNDS)
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


def test_bounds_from_the_environment_keep_the_settings_bounds() -> None:
    assert Bounds.from_environ({}) == Bounds(30.0, 30.0, 2.0)
    assert Bounds.from_environ({"PROJECTOR_STOPPED_AFTER": "1"}).stopped_after == 1.0
    with pytest.raises(ValueError, match="PROJECTOR_STOPPED_AFTER"):
        Bounds.from_environ({"PROJECTOR_STOPPED_AFTER": "0.5"})  # below its minimum of 1


def test_the_answer_lists_at_most_32_consumers_of_the_group() -> None:
    many = tuple(ConsumerHealth(f"c-{i}", 0, float(i), None, False) for i in range(33))
    health = StreamHealth(reachable=True, group_exists=True, consumers=many)
    found = Diagnosis(
        0.0, health, None, CatchUpHealth(available=True), None, judge(health, None, None, BOUNDS)
    )
    answer = found.as_dict()["stream"]
    assert len(answer["consumers"]) == 32 and answer["consumers_total"] == 33
    assert "... and 1 more consumers" in describe(found)[-1]
    assert (
        len(
            Diagnosis(
                0.0,
                StreamHealth(True, consumers=many[:32]),
                None,
                CatchUpHealth(True),
                None,
                found.judgement,
            ).as_dict()["stream"]["consumers"]
        )
        == 32
    )


def test_the_watermark_age_grows_when_the_sweep_never_ran_or_cannot_be_read() -> None:
    """A sweep that never ran, or whose state is unreadable, reads as stale (not as 0)."""
    recorder = GaugeRecorder(now=1000.0)
    never = CatchUpHealth(available=True)  # no sweep recorded yet
    assert recorder.watermark_age(never, now=1030.0) == 30.0
    swept = CatchUpHealth(available=True, swept_seconds_ago=2.0, age_seconds=2.0)
    assert recorder.watermark_age(swept, now=1040.0) == 2.0
    unreadable = CatchUpHealth(available=False, error="read DB: InvalidPasswordError")
    assert recorder.watermark_age(unreadable, now=1100.0) == 62.0  # since the sweep at 1038


def test_a_read_db_not_answering_is_stalled_in_its_own_words() -> None:
    hung = judge(_stream(idle=0.1), None, NO_ANSWER, BOUNDS)
    assert (hung.verdict, hung.cause, hung.reason) == (
        "stalled",
        "ReadDbNotAnswering",
        "read DB: no answer within 5 s",
    )


def test_an_unplaced_transaction_is_listed_but_neither_pins_nor_degrades() -> None:
    unknown = PinningTransaction(777)
    sweep = CatchUpHealth(available=True, watermark=700, age_seconds=1.0, unplaced=(unknown,))
    assert judge(_stream(idle=0.1, pending=0), sweep, None, BOUNDS).verdict == "ok"
    found = Diagnosis(
        0.0,
        _stream(idle=0.1, pending=0),
        None,
        sweep,
        None,
        judge(_stream(0.1), sweep, None, BOUNDS),
    )
    assert any(
        line.startswith("    open, not counted as a pin: transaction 777 (unknown session")
        for line in describe(found)
    )


async def test_within_answers_at_the_bound_and_abandons_work_whose_cleanup_hangs() -> None:
    """Work whose cancellation itself waits (a rollback on a server that does not answer)
    does not hold the caller past the bound."""
    release = asyncio.Event()

    async def hangs() -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()  # cleanup that waits on the same hung server
        return 1

    began = time.monotonic()
    with pytest.raises(TimeoutError, match=NO_ANSWER):
        await within(hangs(), 0.2)
    assert time.monotonic() - began < 1.0
    assert await within(asyncio.sleep(0, result=7), 0.2) == 7
    release.set()

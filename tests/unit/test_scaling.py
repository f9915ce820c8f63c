"""The builtin projector scaler's stabilisation windows: a lag spike does not make it flap."""

from __future__ import annotations

import itertools

from cqrs_operator import scaling
from cqrs_stack.stack_spec import ProjectorAutoscaling

INTERVAL = 15.0  # the operator's default reconcile interval


def auto(up: int = 30, down: int = 300) -> ProjectorAutoscaling:
    return ProjectorAutoscaling(
        enabled=True,
        min_replicas=1,
        max_replicas=10,
        target_lag=100,
        scale_up_window_seconds=up,
        scale_down_window_seconds=down,
    )


def run(config: ProjectorAutoscaling, lags: list[int | None], start: int = 1) -> list[int]:
    """The replicas applied after each lag reading, one reading per interval."""
    current: int | None = start
    samples: list[scaling.Sample] = []
    out = []
    for i, lag in enumerate(lags):
        current, samples = scaling.scale(config, lag, current, samples, 1000.0 + i * INTERVAL)
        out.append(current)
    return out


def changes(counts: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(counts) if a != b)


def test_a_spike_shorter_than_the_scale_up_window_scales_nothing() -> None:
    # One reading at 900 pending events (9 replicas asked for) between quiet ones.
    counts = run(auto(up=30), [0, 0, 900, 0, 0, 0])
    assert counts == [1, 1, 1, 1, 1, 1]


def test_without_windows_the_same_spike_flaps() -> None:
    """The old behaviour (ceil(lag/target) per tick), for contrast: up and straight down."""
    counts = run(auto(up=0, down=0), [0, 0, 900, 0, 900, 0])
    assert counts == [1, 1, 9, 1, 9, 1] and changes(counts) == 4


def test_a_sustained_backlog_scales_up_once_the_window_has_seen_it() -> None:
    counts = run(auto(up=30), [0, 900, 900, 900, 900])
    # Readings at t=15, 30, 45: at t=45 every reading of the last 30 s asks for 9.
    assert counts == [1, 1, 1, 9, 9]


def test_an_oscillating_lag_scales_up_once_and_holds_through_the_down_window() -> None:
    """Bursty load (a backlog every other reading) after a sustained one: one scale-up, then
    the count holds for the scale-down window instead of following every dip."""
    lags = [0, 0] + [900] * 4 + [0, 900] * 8 + [0] * 25
    counts = run(auto(up=30, down=300), lags)
    assert changes(counts) == 2, counts  # up once, down once
    first_up = counts.index(9)
    down_at = counts.index(1, first_up)
    last_busy = len(lags) - 1 - lags[::-1].index(900)
    # Down only once 300 s passed without a reading that asked for 9.
    assert (down_at - last_busy) * INTERVAL >= 300


def test_scale_down_takes_the_highest_count_of_its_window() -> None:
    # A falling backlog: 9, then 5, then 2 asked for; down only to the highest of the window.
    counts = run(auto(up=0, down=30), [900, 500, 200, 200, 200], start=9)
    assert counts == [9, 9, 9, 5, 2]


def test_no_lag_reading_keeps_the_count_and_records_nothing() -> None:
    config = auto()
    count, samples = scaling.scale(config, None, 4, [], 1000.0)
    assert (count, samples) == (4, [])
    assert scaling.scale(config, None, None, [], 1000.0)[0] == config.min_replicas


def test_samples_outside_both_windows_are_dropped_and_bounded() -> None:
    config = auto(up=30, down=60)
    old = [scaling.Sample(1000.0 - 61, 9), scaling.Sample(1000.0 - 10, 3)]
    _, kept = scaling.scale(config, 100, 3, old, 1000.0)
    assert [s.time for s in kept] == [990.0, 1000.0]
    many = [scaling.Sample(1000.0 - i * 0.01, 1) for i in range(1000, 0, -1)]
    assert len(scaling.scale(config, 0, 1, many, 1000.0)[1]) == 1  # one ask of 1 holds them all


def test_recorded_samples_survive_the_status_round_trip() -> None:
    samples = [scaling.Sample(1000.5, 3), scaling.Sample(1015.0, 4)]
    status = {"projector": {"recommendations": scaling.as_status(samples)}}
    assert scaling.recorded_samples(status) == samples
    assert scaling.recorded_samples({"projector": {"recommendations": [{"x": 1}, 5]}}) == []


def test_the_longest_down_window_holds_at_the_shortest_interval() -> None:
    """scaleDownWindowSeconds at its bound (3600) with a 1 s interval: the spike's count holds
    the whole window (found by an attack: 256 samples cut the window to 256 intervals), and
    the kept samples stay few."""
    config = auto(up=0, down=3600)
    current, samples = scaling.scale(config, 800, 1, [], 0.0)
    assert current == 8
    for t in range(1, 3600):
        current, samples = scaling.scale(config, 0, current, samples, float(t))
        assert current == 8, t
        assert len(samples) <= 2 * config.max_replicas + 1
    current, samples = scaling.scale(config, 0, current, samples, 3601.0)
    assert current == 1


def test_compact_keeps_what_either_window_may_need() -> None:
    s = [scaling.Sample(float(t), r) for t, r in enumerate([5, 2, 7, 3, 3, 4])]
    # 5 is lower than nothing newer? no (2 < 5) and higher than every newer? no (7): dropped.
    assert [x.replicas for x in scaling.compact(s)] == [2, 7, 3, 4]

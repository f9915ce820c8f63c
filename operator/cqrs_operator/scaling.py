"""The builtin projector scaler: replicas from stream lag, stabilised as an HPA's behavior.

Each reconcile records what the lag asks for (``ceil(lag / targetLag)`` within min..max) with
its time; the replicas applied are then:

- up only to the *lowest* count asked for over the scale-up window (a lag spike shorter than
  the window scales nothing up);
- down only to the *highest* count asked for over the scale-down window (a dip shorter than
  the window scales nothing down);
- else unchanged.

The recent asks live in ``status.projector.recommendations``, so an operator restart keeps
the windows. Pure functions: the shell passes the clock in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cqrs_stack.stack_spec import ProjectorAutoscaling

# A bound on the samples kept: ``compact`` keeps at most two per replica count (max - min + 1
# counts, at most 2 * MAX_REPLICAS + 1 samples), far below it; this only guards the status.
MAX_SAMPLES = 256


@dataclass(frozen=True)
class Sample:
    """What the lag asked for at ``time`` (seconds since the epoch)."""

    time: float
    replicas: int


def wanted(auto: ProjectorAutoscaling, lag: int) -> int:
    """Replicas one lag reading asks for: ceil(lag / targetLag), within min..max."""
    return max(auto.min_replicas, min(auto.max_replicas, -(-lag // auto.target_lag)))


def stabilised(
    samples: Sequence[Sample], now: float, current: int | None, up_window: float, down_window: float
) -> int:
    """The replicas to run given the recent asks (the newest last, at ``now``) and ``current``.

    Without ``current`` (nothing applied yet) the newest ask is taken as it is.
    """
    newest = samples[-1].replicas
    if current is None:
        return newest
    up = min(s.replicas for s in samples if s.time >= now - up_window)
    down = max(s.replicas for s in samples if s.time >= now - down_window)
    if current < up:
        return up
    if current > down:
        return down
    return current


def recorded_samples(status: Mapping[str, Any]) -> list[Sample]:
    """The samples kept in ``status.projector.recommendations`` (malformed ones skipped)."""
    raw = (status.get("projector") or {}).get("recommendations") or []
    out = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("replicas"), int):
            time = item.get("time")
            if isinstance(time, int | float):
                out.append(Sample(float(time), item["replicas"]))
    return out


def scale(
    auto: ProjectorAutoscaling,
    lag: int | None,
    current: int | None,
    samples: Sequence[Sample],
    now: float,
) -> tuple[int, list[Sample]]:
    """(replicas to apply, samples to keep) after one lag reading at ``now``.

    Without a reading (Redis unreachable) nothing is recorded and ``current`` is kept (the
    minimum when nothing was applied yet).
    """
    horizon = now - max(auto.scale_up_window_seconds, auto.scale_down_window_seconds)
    kept = [s for s in samples if horizon <= s.time <= now]
    if lag is None:
        fallback = current if current is not None else auto.min_replicas
        return max(auto.min_replicas, min(auto.max_replicas, fallback)), compact(kept)[
            -MAX_SAMPLES:
        ]
    kept = compact([*kept, Sample(now, wanted(auto, lag))])[-MAX_SAMPLES:]
    count = stabilised(
        kept, now, current, auto.scale_up_window_seconds, auto.scale_down_window_seconds
    )
    return max(auto.min_replicas, min(auto.max_replicas, count)), kept


def compact(samples: Sequence[Sample]) -> list[Sample]:
    """Drop the samples no window can need (oldest first in, the same order out).

    An older ask is the lowest of a scale-up window only while no newer ask is as low (the
    newer one stays in every window longer), and the highest of a scale-down window only
    while no newer ask is as high. So however long the windows and short the interval, the
    kept samples are bounded by the replica range, and no count is cut off the window.
    """
    kept: list[Sample] = []
    low = high = None
    for sample in reversed(samples):
        if low is None or high is None or sample.replicas < low or sample.replicas > high:
            kept.append(sample)
        low = sample.replicas if low is None else min(low, sample.replicas)
        high = sample.replicas if high is None else max(high, sample.replicas)
    return kept[::-1]


def as_status(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    return [{"time": round(s.time, 3), "replicas": s.replicas} for s in samples]

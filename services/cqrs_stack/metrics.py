"""Prometheus metrics shared by every process (one registry per process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

REQUESTS = Counter(
    "cqrs_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "cqrs_http_request_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_PUBLISHED = Counter("cqrs_events_published_total", "Events added to the stream")
PUBLISH_FAILURES = Counter(
    "cqrs_publish_failures_total", "Batches whose events could not be published (queued)"
)
WRITE_BATCH_SIZE = Histogram(
    "cqrs_write_batch_size",
    "Commands per group-commit transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
WRITE_QUEUE_DEPTH = Gauge(
    "cqrs_write_queue_depth", "Writes accepted and not answered yet (bounded by WRITE_QUEUE_MAX)"
)
EVENTS_PROJECTED = Counter(
    "cqrs_events_projected_total",
    "Commands applied to the read model by this process",
    ["source"],
)
DUPLICATES_SKIPPED = Counter(
    "cqrs_duplicate_events_total", "Deliveries skipped because their command was applied"
)
DEAD_LETTERS = Counter("cqrs_dead_letters_total", "Events moved to the dead-letter stream")
PROJECTION_BATCH_SECONDS = Histogram(
    "cqrs_projection_batch_seconds",
    "Time to apply one batch to the read DB",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
READ_COUNTS_FLUSHED = Counter("cqrs_read_counts_flushed_total", "Reads counted into the read DB")
READ_COUNTS_DROPPED = Counter(
    "cqrs_read_counts_dropped_total",
    "Reads answered but not counted: READ_COUNT_MAX_KEYS keys were waiting for a flush",
)

# The pipeline's health (diagnosis.py), refreshed by each projector every
# PROJECTOR_HEALTH_INTERVAL seconds from Redis and the read DB: every replica reports the same
# group, so alert on max() over replicas. Left at the last reading while Redis is unreachable.
PROJECTION_LAG_EVENTS = Gauge(
    "cqrs_projection_lag_events",
    "Stream entries the consumer group has not acknowledged: undelivered plus pending",
)
PROJECTION_LAG_SECONDS = Gauge(
    "cqrs_projection_lag_seconds",
    "Age of the oldest stream entry not acknowledged yet (0 when none)",
)
PROJECTION_OLDEST_PENDING_SECONDS = Gauge(
    "cqrs_projection_oldest_pending_seconds",
    "Age of the oldest entry delivered to a consumer and not acknowledged (0 when none)",
)


class _DeadLetterEntries:
    """The gauge ``cqrs_dead_letters`` beside the counter ``cqrs_dead_letters_total``.

    prometheus_client names a counter's family without ``_total`` and refuses a second
    collector of that name, although the exposition holds two distinct metrics
    (``cqrs_dead_letters_total`` and ``cqrs_dead_letters``). Describing no names (the
    registry's check) and collecting the one gauge keeps both.
    """

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the gauge to ``value``."""
        self.value = float(value)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "cqrs_dead_letters", "Entries in the dead-letter stream", value=self.value
        )


DEAD_LETTER_ENTRIES = _DeadLetterEntries()
REGISTRY.register(DEAD_LETTER_ENTRIES)  # type: ignore[arg-type]
OLDEST_DEAD_LETTER_SECONDS = Gauge(
    "cqrs_oldest_dead_letter_seconds", "Age of the oldest entry in the dead-letter stream"
)
CATCHUP_WATERMARK_AGE_SECONDS = Gauge(
    "cqrs_catchup_watermark_age_seconds",
    "Time since the catch-up sweep last swept, or the age of the oldest write-DB transaction"
    " pinning its watermark when longer",
)


# labels() validates and locks on every call; a request costs two of them, so the children of
# each (route, method, status) are looked up once. Routes are the app's templates: bounded.
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(route: str, method: str, status: int, started: float) -> None:
    """Count one answered request and its latency since ``started`` (a perf_counter time)."""
    children = _REQUEST_CHILDREN.get((route, method, status))
    if children is None:
        children = (
            REQUESTS.labels(route, method, str(status)),
            REQUEST_SECONDS.labels(route, method),
        )
        _REQUEST_CHILDREN[(route, method, status)] = children
    children[0].inc()
    children[1].observe(time.perf_counter() - started)


def render() -> tuple[bytes, str]:
    """Return the metrics in the Prometheus text format and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST

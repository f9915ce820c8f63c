"""One settings object for every process, read from the original environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The schemes the original service accepted; all are normalised to SQLAlchemy's asyncpg dialect.
_POSTGRES_SCHEMES = ("postgresql+asyncpg://", "postgresql://", "postgres://")


def async_database_url(url: str) -> str:
    """Return ``url`` with the asyncpg driver, accepting plain ``postgresql://`` URLs."""
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme) :]
    raise ValueError(f"not a PostgreSQL URL (expected postgresql://...): {redact_url(url)}")


def plain_database_url(url: str) -> str:
    """Return ``url`` as libpq/asyncpg understand it (``postgresql://``), without the dialect."""
    return "postgresql://" + async_database_url(url)[len("postgresql+asyncpg://") :]


def redact_url(url: str) -> str:
    """Hide the password of a URL so that it can be logged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


class Settings(BaseSettings):
    """Configuration of the write API, read API, projector and tools.

    The first eight fields keep the names of the original service's environment variables;
    the others are additions with defaults that suit a single machine.
    """

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    write_db_url: str = "postgresql://cqrs:cqrs@127.0.0.1:5447/cqrs_write"
    read_db_url: str = "postgresql://cqrs:cqrs@127.0.0.1:5448/cqrs_read"
    redis_url: str = "redis://127.0.0.1:6384/0"
    db_pool_min_size: int = Field(default=5, ge=1, le=1000)
    db_pool_max_size: int = Field(default=20, ge=1, le=1000)
    event_stream_name: str = Field(default="cqrs-events", min_length=1, max_length=200)
    projector_batch_size: int = Field(default=500, ge=1, le=100_000)
    projector_poll_interval: float = Field(default=0.1, gt=0, le=60)

    consumer_group: str = Field(default="projectors", min_length=1, max_length=200)
    consumer_name: str = ""  # empty: hostname + pid, unique per process
    stream_max_length: int = Field(default=1_000_000, ge=0)  # 0: never trim
    projector_max_deliveries: int = Field(default=5, ge=1)
    projector_claim_idle_ms: int = Field(default=30_000, ge=100)
    projector_catchup_interval: float = Field(default=2.0, gt=0)
    # Rebuild: command bytes (keys and values) held in memory at once, whether piped by COPY or
    # applied as one statement; one command larger than this still goes alone.
    rebuild_batch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    # Rebuild swap: the longest it waits for one lock (a reader queued behind the swap waits no
    # longer), and how many times it tries before it gives up and leaves the live model as it is.
    rebuild_lock_timeout: float = Field(default=0.1, ge=0.001, le=10)
    rebuild_swap_attempts: int = Field(default=100, ge=1, le=10_000)
    # Values a projector holds and sends in one statement at most (stream batches and sweep
    # pages alike); well below PostgreSQL's 1 GiB limit on one statement's parameter.
    projector_batch_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024 * 1024, le=256 * 1024 * 1024
    )
    # A sweeper that stops answering (stopped, frozen, cut off) loses the sweep to another
    # replica within this many seconds: its statements and its idle time in the election
    # transaction are each bounded by half of it.
    projector_sweep_timeout: float = Field(default=60.0, ge=1, le=3600)
    publisher_interval: float = Field(default=1.0, gt=0)
    read_count_flush_interval: float = Field(default=0.2, gt=0)
    # Distinct keys whose reads may wait in memory for a flush (a read DB that refuses flushes
    # for long); reads of further keys are answered but not counted.
    read_count_max_keys: int = Field(default=100_000, ge=1, le=10_000_000)
    # On SIGTERM: longest wait for background work in progress (a flush held by a row lock, a
    # projected batch) and for the last read-count flush.
    shutdown_timeout: float = Field(default=20.0, ge=0, le=600)
    # Longest back-off between retries of a failing background task.
    task_retry_max_delay: float = Field(default=5.0, gt=0, le=300)
    max_value_bytes: int = Field(default=1_048_576, ge=1)
    max_body_bytes: int = Field(default=2_097_152, ge=1024)
    read_wait_timeout: float = Field(default=5.0, ge=0, le=60)
    # A ?position= read still gets this long for its final SELECT once its wait ran out.
    read_wait_grace: float = Field(default=0.25, gt=0, le=5)
    write_batch_max: int = Field(default=256, ge=1, le=10_000)
    # Writes accepted and not yet answered, per process; one more is refused with 503.
    write_queue_max: int = Field(default=4096, ge=1, le=1_000_000)
    # How long a write whose connection dropped mid-commit looks for its group before it
    # answers 503 outcome_unknown.
    write_outcome_timeout: float = Field(default=5.0, gt=0, le=60)
    redis_timeout: float = Field(default=2.0, gt=0)
    # While Redis is failing, the write path queues events without waiting on it and probes it
    # this often in the background.
    redis_probe_interval: float = Field(default=1.0, gt=0, le=60)
    # Bytes of values per page of queued events (a page holds at least one event).
    publisher_batch_max_bytes: int = Field(default=16_777_216, ge=1, le=1_073_741_824)
    log_level: str = "info"
    # Valid reads, writes and /health answered below FastAPI (hot_paths.py). Off: every request
    # goes through the framework, e.g. for FastAPI's own OpenTelemetry spans on every call.
    hot_paths: bool = True
    # Off (empty) by default, as the original service had no authentication; when set,
    # POST/PUT /write require "Authorization: Bearer <token>".
    write_api_token: SecretStr = SecretStr("")

    @field_validator("write_db_url", "read_db_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        async_database_url(value)  # raises a clear error for anything but PostgreSQL
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return value

    @property
    def dead_letter_stream(self) -> str:
        """Where poison events go after ``projector_max_deliveries`` attempts."""
        return f"{self.event_stream_name}:dead"

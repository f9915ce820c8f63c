"""One settings object for every process, read from the original environment variables."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import stack_spec as spec

# The local stack's highest port is 8007 (the API): an offset must keep every port under 65536.
MAX_PORT_OFFSET = 57_000

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
    """Hide the password of a URL (and a ``password=`` query parameter) so that it can be logged."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        if ":" in credentials:
            rest = f"{credentials.split(':', 1)[0]}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}{sep}{rest}")


# A password in any text: ``scheme://user:PASSWORD@`` or ``password=PASSWORD`` (URL queries,
# libpq keyword strings). Used on every line a process writes, in case a library echoes a URL.
_TEXT_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s@'\"]*@")
_QUERY_PASSWORD = re.compile(r"((?:^|[?&\s;])password=)[^&\s'\"]*", re.IGNORECASE)
# The variables whose values are or carry secrets.
SECRET_VARIABLES = ("WRITE_DB_URL", "READ_DB_URL", "REDIS_URL", "WRITE_API_TOKEN")
# The OTLP exporter's headers for the collector (TRACING): their values are credentials.
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")


def url_password(url: str) -> str | None:
    """The password a URL carries (in its authority or a ``password=`` parameter), if any."""
    _, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials = rest.rpartition("@")[0]
        if ":" in credentials:
            return credentials.split(":", 1)[1]
    found = re.search(r"[?&]password=([^&]*)", url, re.IGNORECASE)
    return found.group(1) if found else None


def known_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Every secret the configuration holds: URL passwords (as written and decoded), the token.

    Read from the raw environment, so that secrets are known even when the configuration is
    invalid and ``Settings`` cannot be built.
    """
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name in SECRET_VARIABLES:
        value = next((v for k, v in environ.items() if k.upper() == name), "")
        secret = value if name == "WRITE_API_TOKEN" else url_password(value)
        if secret:
            found |= {secret, unquote(secret)}
    for name in HEADER_VARIABLES:
        found |= header_values(environ.get(name, ""))
    # Too short a "secret" would blank out ordinary words; such a password is not a secret.
    return {s for s in found if len(s) >= 3}


def header_values(headers: str) -> set[str]:
    """The values of comma-separated ``name=value`` headers (as written and decoded, each
    stripped); an entry without ``=`` (``Authorization: Bearer ...``) counts whole, so that
    even a malformed entry echoed by a library is hidden."""
    found: set[str] = set()
    for entry in headers.split(","):
        value = entry.partition("=")[2] if "=" in entry else entry
        value = value.strip()
        if value:
            found |= {value, unquote(value).strip()}
    return found


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Hide URL passwords and each of ``secrets`` in free text (messages, tracebacks)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _TEXT_URL_PASSWORD.sub(r"\1***@", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def describe_invalid(exc: ValidationError) -> str:
    """One line per invalid setting, naming the variable and why, never echoing the value.

    Pydantic's own text repeats each input (``input_value='postgresql://user:pw@...'``),
    which would print a password, so only the location and message are kept.
    """
    lines = []
    secrets = known_secrets()
    for error in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(part) for part in error["loc"]).upper() or "configuration"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {name}: {redact_text(message, secrets)}")
    return "\n".join(lines)


def _check_url(value: str) -> None:
    """Refuse a URL that later code could not parse, showing it without its password."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a non-numeric or out-of-range port)
    except ValueError:
        raise ValueError(f"not a valid URL (check host and port): {redact_url(value)}") from None


def dead_letter_stream_of(event_stream: str) -> str:
    """The dead-letter stream of ``event_stream`` (``Settings.dead_letter_stream``): named
    once here for the services and the operator (its ACL rules, its teardown)."""
    return f"{event_stream}:dead"


class Settings(BaseSettings):
    """Configuration of the write API, read API, projector and tools.

    The first eight fields keep the names of the original service's environment variables;
    the others are additions with defaults that suit a single machine.
    """

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    write_db_url: str = "postgresql://cqrs:cqrs@127.0.0.1:5447/cqrs_write"
    read_db_url: str = "postgresql://cqrs:cqrs@127.0.0.1:5448/cqrs_read"
    redis_url: str = "redis://127.0.0.1:6384/0"
    # Bounds shared with the CqrsStack spec (stack_spec.py): one definition for both. The local
    # pools are larger than a stack's default (spec.databases.pool): one process, not N replicas.
    db_pool_min_size: spec.PoolSize = 5
    db_pool_max_size: spec.PoolSize = 20
    event_stream_name: spec.StreamName = Field(default="cqrs-events", min_length=1)
    projector_batch_size: spec.BatchSize = spec.DEFAULT_BATCH_SIZE
    projector_poll_interval: spec.PollInterval = spec.DEFAULT_POLL_INTERVAL

    consumer_group: spec.ConsumerGroup = spec.DEFAULT_CONSUMER_GROUP
    consumer_name: str = ""  # empty: hostname + pid, unique per process
    stream_max_length: spec.StreamMaxLength = spec.DEFAULT_STREAM_MAX_LENGTH  # 0: never trim
    projector_max_deliveries: spec.MaxDeliveries = spec.DEFAULT_MAX_DELIVERIES
    projector_claim_idle_ms: int = Field(default=30_000, ge=100)
    projector_catchup_interval: float = Field(default=2.0, gt=0)
    # Rebuild: command bytes (keys and values) held in memory at once, whether piped by COPY or
    # applied as one statement; one command larger than this still goes alone.
    rebuild_batch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    # Rebuild swap: the longest it waits for one lock (a reader queued behind the swap waits no
    # longer), and how many times it tries before it gives up and leaves the live model as it is.
    rebuild_lock_timeout: float = Field(default=0.1, ge=0.001, le=10)
    rebuild_swap_attempts: int = Field(default=100, ge=1, le=10_000)
    # Rebuild: keys whose new version is compared with the pure function before the swap,
    # chosen at random (0: every key); a difference fails the rebuild, live model unchanged.
    rebuild_verify_sample: int = Field(default=1000, ge=0, le=10_000_000)
    # Rebuild: how long the version a swap replaced is kept for `cqrs-stack rebuild --rollback`
    # (0: dropped at once); the next rebuild or the projectors' housekeeping drops it then.
    rebuild_keep_previous_seconds: float = Field(default=3600.0, ge=0, le=30 * 24 * 3600)
    # Rebuild: finished runs kept in rebuild_runs (the newest ones); each run's start deletes
    # the older ones, so the table stays this small however many rebuilds ran.
    rebuild_runs_kept: int = Field(default=100, ge=1, le=100_000)
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
    # Pipeline health (diagnosis.py): "degraded" once the oldest unacknowledged entry (or the
    # catch-up watermark) is older than PROJECTION_LAG_TARGET seconds; a consumer idle longer
    # than PROJECTOR_STOPPED_AFTER while holding pending entries has stopped reading; the
    # projector refreshes its health gauges every PROJECTOR_HEALTH_INTERVAL seconds.
    projection_lag_target: float = Field(default=30.0, gt=0, le=86_400)
    projector_stopped_after: float = Field(default=30.0, ge=1, le=3600)
    projector_health_interval: float = Field(default=10.0, ge=0.1, le=3600)
    read_count_flush_interval: float = Field(default=0.2, gt=0)
    # SELECTs of records a read API process runs at a time; reads that arrive meanwhile wait
    # for one to end and share the next (fewer, larger queries as the load grows).
    read_select_concurrency: int = Field(default=2, ge=1, le=1000)
    # Keys one such SELECT carries at most (`key = ANY($1)`); reads of more wait for the next.
    read_batch_max_keys: int = Field(default=1000, ge=1, le=100_000)
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
    # A write whose key (or Idempotency-Key) another transaction holds is tried again in later
    # batches for at most this long, then answered 503 key_busy; no batch waits on the lock.
    write_key_busy_timeout: float = Field(default=2.0, gt=0, le=60)
    # The write DB ends a write API session left idle inside a transaction this long (a
    # process frozen mid-transaction), releasing the keys it holds.
    write_idle_transaction_timeout: float = Field(default=10.0, ge=1, le=3600)
    redis_timeout: float = Field(default=2.0, gt=0)
    # While Redis is failing, the write path queues events without waiting on it and probes it
    # this often in the background.
    redis_probe_interval: float = Field(default=1.0, gt=0, le=60)
    # Bytes of keys and values per page of queued events (a page holds at least one event).
    publisher_batch_max_bytes: int = Field(default=16_777_216, ge=1, le=1_073_741_824)
    # /stats counts a table's rows exactly up to this many (and db.EXACT_COUNT_BYTES_PER_ROW
    # bytes of heap per row of it), and estimates them above (an exact count reads every page:
    # seconds at 10 million rows).
    stats_exact_count_max: int = Field(default=100_000, ge=0, le=100_000_000)
    # A write's Idempotency-Key (and its original answer) is kept at least this long (the
    # retention of the process that stored it, set in the key's row), then removed by a
    # background task every IDEMPOTENCY_EXPIRY_INTERVAL seconds, in batches of
    # IDEMPOTENCY_EXPIRY_BATCH keys (one short transaction each).
    idempotency_retention: float = Field(default=86_400.0, ge=1, le=30 * 86_400)
    idempotency_expiry_interval: float = Field(default=60.0, gt=0, le=3600)
    idempotency_expiry_batch: int = Field(default=1000, ge=1, le=100_000)
    log_level: str = "info"  # the spec's LogLevel names, any case
    # Valid reads, writes and /health answered below FastAPI (hot_paths.py). Off: every request
    # goes through the framework, e.g. for FastAPI's own OpenTelemetry spans on every call.
    hot_paths: bool = True
    # OpenTelemetry spans of each write's request, commit, publish and projection, in one trace
    # (tracing.py), set up by the OTEL_* variables; needs the tracing extra. Off: no span, no
    # trace field in stream entries, and OpenTelemetry's SDK is never loaded.
    tracing: bool = False
    # Off (empty) by default, as the original service had no authentication; when set,
    # POST/PUT /write require "Authorization: Bearer <token>".
    write_api_token: SecretStr = SecretStr("")
    # cqrs-stack dev: added to every port of the local stack (--port-offset overrides it).
    dev_port_offset: int = Field(default=0, ge=0, le=MAX_PORT_OFFSET)
    # The read models this stack keeps, comma-separated (records always: GET /read/{key}).
    read_models: str = "records"
    # Entries per page of GET /read/{key}/history at most (and by default).
    history_page_max: int = Field(default=100, ge=1, le=10_000)
    # Dead letters per page of `cqrs-stack dlq list` at most (and by default); `dlq retry --all`
    # reads the dead-letter stream in pages of this many.
    dead_letter_page_max: int = Field(default=100, ge=1, le=10_000)
    # Seconds between steps of the ledger's pruning (rows below each model's watermark).
    ledger_prune_interval: float = Field(default=30.0, gt=0, le=3600)
    # Positions one pruning step looks at (and ledger rows it deletes) at most.
    ledger_prune_step: int = Field(default=50_000, ge=100, le=1_000_000)
    # cqrs-stack migrate: also write the JSON report to this file (the migration Job's
    # termination message, which the operator reads); empty: stdout only.
    migrate_report_file: str = Field(default="", max_length=4096)

    @field_validator("write_db_url", "read_db_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        async_database_url(value)  # raises a clear error for anything but PostgreSQL
        _check_url(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"must start with redis://, rediss:// or unix://, not {redact_url(value)}"
            )
        _check_url(value)
        return value

    @field_validator("tracing")
    @classmethod
    def _tracing(cls, value: bool) -> bool:
        if value and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ValueError("needs the tracing extra: pip install 'cqrs-stack[tracing]'")
        return value

    @field_validator("read_models")
    @classmethod
    def _read_models(cls, value: str) -> str:
        from .projections import REQUIRED, by_name

        names = [name.strip() for name in value.split(",") if name.strip()]
        for name in names:
            by_name(name)  # raises naming the known models
        if REQUIRED not in names:
            raise ValueError(f"must include {REQUIRED!r} (GET /read/{{key}} serves it)")
        return ",".join(dict.fromkeys(names))

    @property
    def read_model_names(self) -> tuple[str, ...]:
        """The read models this stack keeps (READ_MODELS), records first."""
        from .projections import enabled

        return tuple(p.name for p in enabled(self.read_models.split(",")))

    @property
    def dead_letter_stream(self) -> str:
        """Where poison events go after ``projector_max_deliveries`` attempts."""
        return dead_letter_stream_of(self.event_stream_name)

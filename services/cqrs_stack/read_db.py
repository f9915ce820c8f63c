"""The read DB: serving records and histories, counting reads, and the projector's figures."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Sequence
from itertools import islice
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import BigInteger, String, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import driver_connection, driver_of, row_count_sql
from .metrics import READ_COUNTS_DROPPED, READ_COUNTS_FLUSHED
from .projections import Projection
from .projections import base as projection
from .projections.history import PAGE as _HISTORY_PAGE
from .projections.records import Records
from .supervision import Backoff

log = logging.getLogger(__name__)


def _json_time(column: str) -> str:
    """SQL for ``column``'s time as pydantic writes it in JSON: ``isoformat()`` in UTC, with
    its fraction only when it is not zero, and ``Z`` (written after it by the caller)."""
    # Clamped as asyncpg decodes times, to Python's range (infinity is datetime.max).
    utc = (
        f"least(greatest({column} AT TIME ZONE 'UTC', '0001-01-01'::timestamp),"
        " '9999-12-31 23:59:59.999999'::timestamp)"
    )
    return (
        f"to_char({utc}, CASE WHEN date_trunc('second', {utc}) = {utc}"
        """ THEN 'YYYY-MM-DD"T"HH24:MI:SS' ELSE 'YYYY-MM-DD"T"HH24:MI:SS.US' END)"""
    )


# The answer's JSON up to its read count is written by the read DB (``head``): the fields
# but the count are the row's, and formatting them here cost the API more than the rest of a
# read (escaping two strings, two times, one format; ``read_api.found_json`` adds the rest).
# ``to_json`` escapes text as pydantic does (the same characters, the same \u00xx); the bytes
# come as UTF-8 (bytea), so asyncpg decodes no text and nothing is encoded again per read.
# tests/integration/test_read_answers.py holds every answer to RecordResponse's JSON.
_GET_RECORDS = (
    "SELECT key, read_count, write_count, convert_to(concat("
    """'{"success":true,"key":', to_json(key), ',"value":', to_json(value), ',"created_at":"', """
    f"{_json_time('created_at')}, "
    """'Z","updated_at":"', """
    f"{_json_time('updated_at')}, "
    """'Z","read_count":'), 'UTF8') AS head"""
    " FROM records WHERE key = ANY($1::text[])"
)


class Found(NamedTuple):
    """A record as a read answers it: its JSON up to the read count, the count, the version."""

    head: bytes  # '{"success":true,"key":...,"updated_at":"...","read_count":'
    read_count: int  # the row's, plus the reads counted in memory (this one too)
    write_count: int  # the key's version: its number of commands applied (the ETag)


_ADD_READ_COUNTS = text(
    """
    UPDATE records SET read_count = records.read_count + counted.reads
    FROM (SELECT * FROM unnest(:keys, :reads) AS u(key, reads) ORDER BY key) AS counted
    WHERE records.key = counted.key
    """
).bindparams(bindparam("keys", type_=ARRAY(String)), bindparam("reads", type_=ARRAY(BigInteger)))


_Answer = asyncio.Future[Found | None]
# A SELECT during which a flush of one of its keys committed runs again at once, at most this
# many times in all (flushes are at least an interval apart, a SELECT takes milliseconds).
_FLUSH_OVERLAP_TRIES = 3
# Committed flushes remembered for that check; a SELECT that outlasts more looks again.
_RECENT_FLUSHES = 8


class RecordReader:
    """Point reads of records, coalesced: concurrent reads share one SELECT.

    The reads that arrive during one turn of the event loop become one ``key = ANY($1)``
    query on one pooled connection, so under load the per-read cost of acquiring a connection
    and of a round trip is paid once per batch; a lone read still runs at once (next turn).
    At most ``concurrency`` SELECTs run at a time: reads that arrive while they do wait for
    the first to end and go together in the next, so the batches grow with the load instead
    of the number of queries (each one costs the API and the read DB the same whatever its
    keys: a statement's round trip, its bind and its plan). One SELECT carries at most
    ``max_keys`` keys (the first to come); the rest go in the next. A plain autocommit read:
    no transaction, no locks.

    An answer's ``read_count`` is the row's plus the reads ``counter`` holds in memory
    (pending or in a flush not committed yet). Only a flush of one of the SELECT's keys that
    commits while the SELECT runs leaves it unknown whether the row already has those reads:
    such a SELECT runs again at once. A flush held by a row lock delays no read.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        counter: ReadCounter,
        concurrency: int = 2,
        max_keys: int = 1000,
    ) -> None:
        self._pool = pool
        self._counter = counter
        self._concurrency = concurrency
        self._max_keys = max_keys  # keys in one SELECT at most; the others wait for the next
        self._waiting: dict[str, list[_Answer]] = {}
        self._fetching: set[asyncio.Task[None]] = set()
        self._scheduled = False  # a _start_batch is due in the loop's next turn

    async def get(self, key: str, within: float | None = None) -> Found | None:
        """Return the record of ``key``, or None; count the read if found.

        Only a read answered with its record counts (an error or a miss does not). With
        ``within``, a read the database does not answer in time raises ``OperationalError``
        (answered 503) and is not counted; the shared SELECT goes on for the others.
        """
        loop = asyncio.get_running_loop()
        if not self._scheduled and len(self._fetching) < self._concurrency:
            self._scheduled = True
            loop.call_soon(self._start_batch)
        answer: _Answer = loop.create_future()
        self._waiting.setdefault(key, []).append(answer)
        if within is None:
            return await answer
        try:
            async with asyncio.timeout(within):
                return await answer
        except TimeoutError as exc:
            raise OperationalError("read", None, exc) from exc

    def _start_batch(self) -> None:
        self._scheduled = False
        # Nothing to read, or every SELECT is running: the end of one starts the next.
        while self._waiting and len(self._fetching) < self._concurrency:
            if len(self._waiting) <= self._max_keys:
                batch, self._waiting = self._waiting, {}
            else:  # the first to come go first; a later read of a waiting key joins it
                first = list(islice(self._waiting, self._max_keys))
                batch = {key: self._waiting.pop(key) for key in first}
            task = asyncio.create_task(self._fetch(batch))
            self._fetching.add(task)
            task.add_done_callback(self._fetched)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        """A SELECT ended: the reads that waited for a free one go in the next."""
        self._fetching.discard(task)
        if self._waiting:
            self._start_batch()

    async def _fetch(self, batch: dict[str, list[_Answer]]) -> None:
        try:
            rows, unseen = await self._select(list(batch))
        except asyncio.CancelledError:
            for answer in _flatten(batch):
                answer.cancel()
            raise
        except Exception as exc:  # every waiter learns of the failure
            for answer in _flatten(batch):
                if not answer.done():
                    answer.set_exception(exc)
            return
        found = {row[0]: row for row in rows}
        counted = self._counter.counted
        # Counted here, in the same turn as the flush check in _select: the row holds every
        # committed read and memory the rest, so each answer counts each read exactly once.
        for key, answers in batch.items():
            row = found.get(key)
            if row is None:
                for answer in answers:
                    if not answer.done():
                        answer.set_result(None)
                continue
            _, stored, writes, head = row
            if unseen:
                stored += unseen[key]
            for answer in answers:
                if answer.done():
                    continue  # its caller gave up (timeout, client gone): not a read
                answer.set_result(Found(head, stored + counted(key), writes))

    async def _select(self, keys: list[str]) -> tuple[list[asyncpg.Record], Counter[str]]:
        """The rows of ``keys``, and the reads of flushes that committed while the last
        SELECT ran (empty unless every try overlapped one: they are then added, so that an
        answer may count a read twice but never misses one it already showed)."""
        for _ in range(_FLUSH_OVERLAP_TRIES):
            before = self._counter.commits
            async with driver_connection(self._pool) as conn:
                rows: list[asyncpg.Record] = await conn.fetch(_GET_RECORDS, keys)
            unseen = self._counter.committed_since(before, keys)
            if not unseen:
                return rows, unseen
        return rows, unseen


def _flatten(batch: dict[str, list[_Answer]]) -> list[_Answer]:
    return [answer for answers in batch.values() for answer in answers]


async def position_applied(
    pool: asyncpg.Pool, position: int, model: type[Projection] = Records
) -> bool:
    """Has ``model`` applied the command at ``position``?"""
    async with driver_connection(pool) as conn:
        return await projection.position_applied(conn, model, position)


async def wait_for_position(
    pool: asyncpg.Pool,
    position: int,
    deadline: float,
    floor: float,
    model: type[Projection] = Records,
) -> bool:
    """Wait until ``model`` applied ``position``, at most until ``deadline`` (the loop's clock).

    Every query is bounded by the time left, so one stuck behind a lock ends at the deadline
    and the answer is "not reached". The first query gets at least ``floor`` seconds, so that
    a wait of 0 still looks once.
    """
    loop = asyncio.get_running_loop()
    delay = 0.002
    bound = max(deadline - loop.time(), floor)
    while True:
        try:
            async with asyncio.timeout(bound):
                if await position_applied(pool, position, model):
                    return True
        except TimeoutError:
            return False
        bound = deadline - loop.time()
        if bound <= 0:
            return False
        await asyncio.sleep(min(delay, bound))
        delay = min(delay * 2, 0.05)
        bound = deadline - loop.time()
        if bound <= 0:
            return False


class ReadCounter:
    """Counts reads in memory and adds them to ``records.read_count`` in periodic batches.

    A read therefore costs one indexed SELECT and no row lock (guarantee 3). A failed flush
    keeps its counts for the next attempt; at most ``max_keys`` distinct keys wait in memory
    (a read of another key is then answered but not counted, and logged). A crash loses the
    reads not yet flushed; a graceful stop (``drain``) flushes them.
    """

    def __init__(self, engine: AsyncEngine, interval: float, max_keys: int = 100_000) -> None:
        self._engine = engine
        self.interval = interval
        self._max_keys = max_keys
        self._pending: Counter[str] = Counter()
        # Being written right now: still counted in answers until the UPDATE has committed.
        self._in_flight: Counter[str] = Counter()
        self._dropped = 0  # reads not counted because memory held max_keys keys
        self._commits = 0
        # The last committed flushes (number, batch), for SELECTs that overlapped them.
        self._recent: deque[tuple[int, Counter[str]]] = deque(maxlen=_RECENT_FLUSHES)

    def count(self, key: str) -> bool:
        """Count one read of ``key``; False if it was dropped because memory is full."""
        # A key already held (waiting, or in the flush under way) always counts; a new one only
        # while fewer than max_keys are held (a key in both is counted twice: never over).
        held = key in self._pending or key in self._in_flight
        if not held and len(self._pending) + len(self._in_flight) >= self._max_keys:
            self._dropped += 1
            return False
        self._pending[key] += 1
        return True

    def counted(self, key: str) -> int:
        """Count one read of ``key`` (``count``); the reads of it now held in memory."""
        self.count(key)
        return self._pending.get(key, 0) + self._in_flight.get(key, 0)

    def unflushed(self, key: str) -> int:
        """Reads of ``key`` counted here but not yet committed to the read DB."""
        return self._pending.get(key, 0) + self._in_flight.get(key, 0)

    @property
    def flushing(self) -> bool:
        """Is a flush under way (sent, not committed or failed yet)?"""
        return bool(self._in_flight)

    @property
    def commits(self) -> int:
        """How many flushes have committed so far."""
        return self._commits

    def committed_since(self, commits: int, keys: list[str]) -> Counter[str]:
        """Reads of ``keys`` written by the flushes that committed after ``commits`` did.

        When more flushes committed than are remembered, every key is reported with at
        least one read (unknown, but not none).
        """
        found: Counter[str] = Counter()
        if self._commits - commits > len(self._recent):
            return Counter(dict.fromkeys(keys, 1))
        for number, batch in self._recent:
            if number > commits:
                for key in keys:
                    found[key] += batch.get(key, 0)
        return +found

    async def flush_round(self) -> None:
        """One round of the supervised flush loop."""
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            READ_COUNTS_DROPPED.inc(dropped)
            log.warning(
                "reads not counted, too many keys wait for a flush dropped=%d max_keys=%d",
                dropped,
                self._max_keys,
            )
        await self.flush()

    async def flush(self) -> int:
        """Write the counted reads to the read DB; return how many reads were written."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, Counter()
        self._in_flight = batch
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    _ADD_READ_COUNTS, {"keys": list(batch), "reads": list(batch.values())}
                )
            # Same turn as clearing _in_flight: a SELECT that ran across the commit sees it.
            self._commits += 1
            self._recent.append((self._commits, batch))
        except BaseException:
            self._pending.update(batch)  # kept for the next attempt (or the stop's report)
            raise
        finally:
            self._in_flight = Counter()
        total = sum(batch.values())
        READ_COUNTS_FLUSHED.inc(total)
        return total

    async def drain(self, within: float) -> None:
        """Flush every counted read, retrying for at most ``within`` seconds (a graceful stop).

        Call once the periodic flush has stopped. What is still unflushed at the bound is
        lost, and logged.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        backoff = Backoff(maximum=1.0)
        while self._pending:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await self.flush()
            except Exception as exc:
                log.warning("read count flush failed while stopping, retrying error=%s", exc)
                await asyncio.sleep(min(backoff.next_delay(), max(0.0, deadline - loop.time())))
        lost = sum(self._pending.values())
        if lost:
            log.error(
                "read counts not stored: the read DB took longer than the stop allows"
                " reads=%d keys=%d within=%.1fs",
                lost,
                len(self._pending),
                within,
            )


async def projector_figures(engine: AsyncEngine, exact_max: int) -> dict[str, Any]:
    """Return the read model's size and the projector's progress across all consumers.

    The records, and the ledger's rows above its watermark, are counted exactly up to
    ``exact_max`` rows and estimated above (``db.row_count_sql``): an exact count of millions
    of rows is not free, and a ledger holds that many right after a rebuild.
    """
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT records.n, records.estimated,"
                    " (SELECT coalesce(sum(events_projected), 0) FROM projector_consumers),"
                    " (SELECT max(last_event_at) FROM projector_consumers)"
                    f" FROM ({row_count_sql('records')}) AS records"
                ),
                {"exact_max": exact_max},
            )
        ).one()
        ledger = await projection.progress(await driver_of(conn), Records, exact_max)
    return {
        "records": int(row[0]),
        "records_estimated": bool(row[1]),
        "last_projected_position": ledger.last_position,
        "applied_commands": ledger.applied,
        "applied_commands_estimated": ledger.estimated,
        "events_projected": int(row[2]),
        "last_projected_event_at": row[3],
    }


async def model_figures(
    engine: AsyncEngine, models: Sequence[type[Projection]], exact_max: int
) -> dict[str, Any]:
    """Per read model: commands applied, the highest applied, the watermark, ledger rows
    (estimated past ``exact_max`` rows, as ``projection.progress`` says)."""
    found: dict[str, Any] = {}
    async with engine.connect() as conn:
        driver = await driver_of(conn)
        for model in models:
            figures = await projection.progress(driver, model, exact_max)
            found[model.name] = {
                "applied": figures.applied,
                "last_position": figures.last_position,
                "watermark": figures.watermark,
                "ledger_rows": figures.ledger_rows,
                "estimated": figures.estimated,
            }
    return found


async def models_kept_elsewhere(
    engine: AsyncEngine, models: Sequence[type[Projection]]
) -> list[str]:
    """The models some replica sweeps (a cursor in the read DB) that ``models`` lack: the
    replicas' READ_MODELS differ."""
    async with engine.connect() as conn:
        swept = await conn.scalar(text("SELECT array_agg(model) FROM projector_catchup"))
    return sorted(set(swept or ()) - {model.name for model in models})


async def history_page(
    pool: asyncpg.Pool, key: str, before: int | None, limit: int
) -> tuple[list[asyncpg.Record], int | None]:
    """Up to ``limit`` commands of ``key`` below position ``before``, newest first, and the
    cursor of the next page (None when this is the last). One index range read."""
    below = 2**63 - 1 if before is None else before
    async with driver_connection(pool) as conn:
        rows: list[asyncpg.Record] = await conn.fetch(_HISTORY_PAGE, key, below, limit + 1)
    if len(rows) > limit:
        return rows[:limit], int(rows[limit - 1]["position"])
    return rows, None

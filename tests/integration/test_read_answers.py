"""A read's answer is written by the read DB and the reader (read_db.Found, read_api.found_json),
byte for byte as pydantic writes RecordResponse: any text PostgreSQL holds (every control
character, quotes, backslashes, non-ASCII), any time (whole seconds, microseconds, years 1 and
9999, offsets other than UTC), every ``position_reached``."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from cqrs_stack import db
from cqrs_stack.models import RecordResponse
from cqrs_stack.read_api import found_json
from cqrs_stack.read_db import ReadCounter, RecordReader
from tests.fixtures.stack import Stack

_ODD = "".join(map(chr, range(1, 0x20))) + '\x7f"\\/é\u2028\u2029\ufeff😀\U0010ffff'
_TIMES = [
    dt.datetime(2026, 12, 1, 19, 1, 31, tzinfo=dt.UTC),  # whole seconds: no fraction
    dt.datetime(2026, 12, 1, 19, 1, 31, 120000, tzinfo=dt.UTC),
    dt.datetime(2026, 12, 1, 19, 1, 31, 1, tzinfo=dt.UTC),
    dt.datetime(2026, 12, 1, 19, 1, 31, 999999, tzinfo=dt.UTC),
    dt.datetime(1, 1, 1, tzinfo=dt.UTC),
    dt.datetime(999, 3, 4, 5, 6, 7, 80, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.datetime(2026, 6, 1, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2, minutes=30))),
]


def _random_text(rng: random.Random) -> str:
    # Any code point PostgreSQL's text holds: no NUL, no surrogates.
    alphabet = [chr(rng.choice([rng.randrange(1, 0x80), rng.randrange(0x80, 0xD800)]))]
    alphabet += [rng.choice(_ODD) for _ in range(3)]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))


def _random_time(rng: random.Random) -> dt.datetime:
    moment = dt.datetime(1, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
        seconds=rng.randrange(0, 315_537_897_599),
        microseconds=rng.choice([0, rng.randrange(10**6)]),
    )
    return moment


def _records() -> list[tuple[str, str, dt.datetime, dt.datetime, int, int]]:
    rng = random.Random(13)
    found = [
        (f"odd{i}{c}", c * 3, _TIMES[i % 8], _TIMES[-i % 8], i, i + 1) for i, c in enumerate(_ODD)
    ]
    found.append(("", "", _TIMES[0], _TIMES[1], 0, 1))  # the SELECT never sees "" from a route
    found.append((_ODD, _ODD, _TIMES[4], _TIMES[6], 2**62, 2**62))
    for i in range(400):
        key = f"r{i}" + _random_text(rng)
        reads, writes = rng.randrange(2**40), rng.randrange(1, 2**40)
        found.append((key, _random_text(rng), _random_time(rng), _random_time(rng), reads, writes))
    return found


@pytest_asyncio.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    """The hot paths' asyncpg pool on the stack's read DB."""
    pool = await db.create_pool(stack.settings.read_db_url, stack.settings, application_name="t")
    yield pool
    await pool.close()


async def test_every_answer_is_the_models_json(stack: Stack, pool: asyncpg.Pool) -> None:
    records = _records()
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO records (key, value, created_at, updated_at, read_count, write_count,"
            " first_command_id, last_command_id) VALUES ($1, $2, $3, $4, $5, $6, 1, 1)",
            records,
        )
    reader = RecordReader(pool, ReadCounter(stack.read_engine, interval=3600))
    for turn, reached in enumerate((None, True, False)):
        # All at once: they share SELECTs, as under load.
        answers = await asyncio.wait_for(asyncio.gather(*(reader.get(r[0]) for r in records)), 30)
        for (key, value, created, updated, reads, writes), found in zip(
            records, answers, strict=True
        ):
            assert found is not None
            model = RecordResponse.model_construct(
                key=key,
                value=value,
                created_at=created.astimezone(dt.UTC),  # as the read DB gives it back
                updated_at=updated.astimezone(dt.UTC),
                read_count=found.read_count,
                write_count=writes,
                position_reached=reached,
            )
            assert found_json(found, reached) == model.model_dump_json().encode(), key
            assert found.write_count == writes
            assert found.read_count == reads + turn + 1  # the row's, and memory's

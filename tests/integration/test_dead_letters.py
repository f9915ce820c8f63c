"""Dead letters you can act on: a poison command is dead-lettered, fixed, retried and applied
exactly once; drops are recorded without the value; pages stop at DEAD_LETTER_PAGE_MAX."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text

from cqrs_stack import dead_letters, stream
from cqrs_stack.cli import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_REDIS, EXIT_REFUSED
from cqrs_stack.events import Command, encode
from cqrs_stack.localservers import free_port
from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_guarantees import write_many
from tests.integration.test_newcomer import run_cli

# The read DB refuses this value (SQLSTATE 23514): a poison command until the check goes.
_POISON_CHECK = "ALTER TABLE records ADD CONSTRAINT no_poison CHECK (value <> 'poison')"
_PROJECTOR = {
    "PROJECTOR_MAX_DELIVERIES": "2",
    "PROJECTOR_CLAIM_IDLE_MS": "200",
    # Only the stream consumer applies: the sweep would retry the command on its own.
    "PROJECTOR_CATCHUP_INTERVAL": "3600",
}


async def _execute(stack: Stack, sql: str) -> None:
    async with stack.read_engine.begin() as conn:
        await conn.execute(text(sql))


async def _write(url: str, key: str, value: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{url}/write", json={"key": key, "value": value})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["position"])


async def _applied(stack: Stack, key: str) -> tuple[int, int, int]:
    """write_count of ``key`` in records, its rows in history and in the records ledger."""
    async with stack.read_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT coalesce(sum(write_count), 0) FROM records WHERE key = :k),"
                    " (SELECT count(*) FROM history WHERE key = :k),"
                    " (SELECT count(*) FROM applied_commands a JOIN history h"
                    "  ON h.position = a.command_id WHERE h.key = :k)"
                ),
                {"k": key},
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


async def test_a_poison_command_fixed_and_retried_is_applied_exactly_once(stack: Stack) -> None:
    stack.env["READ_MODELS"] = "records,history"
    settings = stack.settings
    await _execute(stack, _POISON_CHECK)
    api = await stack.launch("api")
    await stack.launch("projector", **_PROJECTOR)
    positions = {key: await _write(api.url, key, "poison") for key in ("p1", "p2", "p3")}
    await write_many(api.url, 30, prefix="healthy")

    async def dead_lettered() -> bool:
        return int(await stack.redis.xlen(settings.dead_letter_stream)) == 3

    await wait_until(dead_lettered, 30, "the three poison commands to be dead-lettered")
    page = await dead_letters.list_page(stack.redis, settings)
    ids = {letter.key: letter.entry_id for letter in page.entries}
    assert sorted(ids) == ["p1", "p2", "p3"] and page.next_after is None
    first = page.entries[0]
    assert first.position == positions[first.key] and first.deliveries == 2
    assert first.reason == "read DB refused the command" and first.age_seconds >= 0
    engines = (stack.redis, stack.write_engine, stack.read_engine, settings)

    # Not fixed yet: refused again, and the entry stays.
    with pytest.raises(dead_letters.RetryRefused, match="23514"):
        await dead_letters.retry(*engines, ids["p1"])
    assert await stack.redis.xlen(settings.dead_letter_stream) == 3

    await _execute(stack, "ALTER TABLE records DROP CONSTRAINT no_poison")
    outcome = await dead_letters.retry(*engines, ids["p1"])
    assert (outcome.result, outcome.position) == ("applied", positions["p1"])
    assert await _applied(stack, "p1") == (1, 1, 1)
    # The same id again: gone from the stream, nothing applied twice.
    with pytest.raises(dead_letters.DeadLetterNotFound):
        await dead_letters.retry(*engines, ids["p1"])
    # A second copy of the same command (two consumers dead-lettering one entry): a no-op.
    entry = stream.Entry("0-1", {k.encode(): v.encode() for k, v in _encoded("p1", positions)})
    await stream.dead_letter(stack.redis, settings, entry, "copy", "test")
    [copy] = [
        e for e in (await dead_letters.list_page(stack.redis, settings)).entries if e.key == "p1"
    ]
    assert (await dead_letters.retry(*engines, copy.entry_id)).result == "already applied"
    assert await _applied(stack, "p1") == (1, 1, 1)

    # Retries at once, of one id and of all: each command applied once, every entry gone.
    found = await asyncio.gather(
        dead_letters.retry_all(*engines),
        dead_letters.retry_all(*engines),
        dead_letters.retry(*engines, ids["p2"]),
        dead_letters.retry(*engines, ids["p2"]),
        dead_letters.retry(*engines, ids["p3"]),
        return_exceptions=True,
    )
    errors = [f for f in found if isinstance(f, BaseException)]
    assert all(isinstance(e, dead_letters.DeadLetterNotFound) for e in errors), errors
    outcomes = [o for f in found if not isinstance(f, BaseException) for o in _as_list(f)]
    applied = [o for o in outcomes if o.result == "applied"]
    assert sorted(o.position for o in applied) == sorted([positions["p2"], positions["p3"]])
    assert {o.result for o in outcomes} <= {"applied", "already applied"}
    assert await _applied(stack, "p2") == (1, 1, 1)
    assert await _applied(stack, "p3") == (1, 1, 1)
    assert await stack.redis.xlen(settings.dead_letter_stream) == 0
    await stack.assert_converges()


def _as_list(found: object) -> list[dead_letters.Outcome]:
    return found if isinstance(found, list) else [found]  # type: ignore[list-item]


def _encoded(key: str, positions: dict[str, int]) -> list[tuple[str, str]]:
    command = Command(positions[key], key, "poison", "RecordCreated", datetime.now(UTC))
    return list(encode(command).items())


async def _dead_letter(stack: Stack, fields: dict[str, str], reason: str = "refused") -> str:
    entry = stream.Entry("1-1", {k.encode(): v.encode() for k, v in fields.items()}, 5)
    await stream.dead_letter(stack.redis, stack.settings, entry, reason, "test-consumer")
    rows = await stack.redis.xrevrange(stack.settings.dead_letter_stream, count=1)
    return str(rows[0][0].decode())


async def _stored_commands(stack: Stack, count: int) -> list[Command]:
    async with stack.write_engine.begin() as conn:
        rows = await conn.execute(
            text(
                "INSERT INTO commands (key, value, event_type) SELECT 'stored-' || i,"
                " 'secret-value-' || i, 'RecordCreated' FROM generate_series(1, :n) AS i"
                " RETURNING id, key, value, event_type, created_at"
            ),
            {"n": count},
        )
        return [Command(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


def _cli(stack: Stack, *args: str, **env: str) -> tuple[int, str, str]:
    done = run_cli("dlq", *args, env={**stack.env, **env})
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


async def _clis(stack: Stack, *calls: list[str], **env: str) -> list[tuple[int, str, str]]:
    """Independent ``dlq`` commands at once (each is a process that starts in a second)."""
    return list(await asyncio.gather(*(asyncio.to_thread(_cli, stack, *c, **env) for c in calls)))


async def test_list_pages_stop_at_the_bound_and_retry_all_crosses_them(stack: Stack) -> None:
    commands = await _stored_commands(stack, 4)
    ids = [await _dead_letter(stack, encode(c)) for c in commands]
    bound = {"DEAD_LETTER_PAGE_MAX": "3"}

    first, second, at_bound, past = await _clis(
        stack,
        ["list", "--json"],
        ["list", "--json", "--after", ids[2]],
        ["list", "--limit", "3"],
        ["list", "--limit", "4"],
        **bound,
    )
    assert first[0] == 0, first[2]
    page = json.loads(first[1])
    assert [e["id"] for e in page["dead_letters"]] == ids[:3]
    assert page["next_after"] == ids[2] and page["total"] == 4
    assert "secret-value" not in first[1]  # values are never listed
    page = json.loads(second[1])
    assert [e["id"] for e in page["dead_letters"]] == ids[3:] and page["next_after"] is None
    assert at_bound[0] == 0 and "3 of 4 dead letters; next page: --after" in at_bound[1]
    assert past[0] == EXIT_CONFIG and "1 to 3 dead letters" in past[2]

    # Retry of every entry, across the two pages: each command applied once.
    code, out, err = _cli(stack, "retry", "--all", **bound)
    assert code == 0, err
    assert "retried 4 dead letters: 4 applied or already applied, 0 left" in out
    assert await stack.redis.xlen(stack.settings.dead_letter_stream) == 0
    await stack.assert_converges(10)


async def test_drop_is_recorded_without_the_value(stack: Stack) -> None:
    [command] = await _stored_commands(stack, 1)
    stored = await _dead_letter(stack, encode(command))
    malformed = await _dead_letter(stack, {"type": "RecordCreated", "key": "x"}, "not an event")

    # Nothing to apply again for an entry without a command: told to drop it.
    code, _, err = _cli(stack, "retry", malformed)
    assert code == EXIT_REFUSED and "carries no command position" in err and "drop it" in err
    code, out, err = _cli(stack, "drop", stored, "--reason", "bad data upstream", "--by", "alice")
    assert code == 0 and f"dropped {stored}" in out, err
    code, out, err = _cli(stack, "drop", malformed, "--reason", "not ours", USER="tester")
    assert code == 0, err
    async with stack.read_engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT entry_id, key, position, reason, dropped_by, entry"
                    " FROM dead_letter_drops ORDER BY entry_id"
                )
            )
        ).all()
    assert [r[:5] for r in rows] == [
        (stored, command.key, command.position, "bad data upstream", "alice"),
        (malformed, "x", None, "not ours", "tester"),  # --by: the OS user
    ]
    recorded = rows[0][5]
    assert "value" not in recorded and recorded["value_bytes"] == len(command.value)
    assert recorded["value_sha256"] and recorded["deliveries"] == 5
    assert command.value not in json.dumps(recorded)
    assert await stack.redis.xlen(stack.settings.dead_letter_stream) == 0
    # Gone: a second drop or a retry names the id as unknown; a malformed id is refused.
    again, retried, nonsense, no_reason = await _clis(
        stack,
        ["drop", stored, "--reason", "again"],
        ["retry", stored],
        ["retry", "nonsense"],
        ["drop", stored, "--reason", " "],
    )
    for code, _, err in (again, retried):
        assert code == EXIT_NOT_FOUND and f"no dead letter {stored}" in err
    assert nonsense[0] == EXIT_CONFIG and "not a dead-letter id" in nonsense[2]
    assert no_reason[0] == EXIT_CONFIG and "reason" in no_reason[2]


async def test_redis_down_is_one_clear_line(stack: Stack) -> None:
    dead = f"redis://:Pw-{free_port()}@127.0.0.1:{free_port()}/0"
    calls = (["list"], ["retry", "--all"], ["drop", "1-1", "--reason", "r"])
    for code, out, err in await _clis(stack, *calls, REDIS_URL=dead):
        assert code == EXIT_REDIS and "cannot reach the Redis" in err, err
        assert len(err.strip().splitlines()) == 1 and "Pw-" not in out + err, err


async def test_an_id_past_64_bits_is_an_invalid_argument(stack: Stack) -> None:
    # Matches the digits pattern; each part of a stream id is at most 2^64-1.
    top = 2**64 - 1
    for bad in (f"{top + 1}-0", f"0-{top + 1}", "99999999999999999999-0"):
        calls = (["retry", bad], ["list", "--after", bad], ["drop", bad, "--reason", "r"])
        for code, out, err in await _clis(stack, *calls):
            assert code == EXIT_CONFIG and "is not a dead-letter id" in err, (code, out, err)
    # The largest valid id is an id: not found, not refused as an argument.
    code, _, err = (await _clis(stack, ["retry", f"{top}-{top}"]))[0]
    assert code == EXIT_NOT_FOUND, err

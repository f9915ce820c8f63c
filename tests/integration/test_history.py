"""The history read model through the running stack: GET /read/{key}/history paged at its
bounds, READ_MODELS (not enabled, unknown), rebuild --model and verify, and the projector
pruning its ledgers while duplicates arrive."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from sqlalchemy import text

from tests.fixtures.stack import Stack, wait_until
from tests.integration.test_guarantees import write_many

PAGE_MAX = 4


def cqrs_stack(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def write_key(client: httpx.AsyncClient, key: str, count: int) -> list[dict]:
    answers = []
    for i in range(count):
        method = "POST" if i == 0 else "PUT"
        answer = await client.request(method, "/write", json={"key": key, "value": f"v{i}"})
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    return answers


async def test_history_pages_newest_first_with_a_cursor(stack: Stack) -> None:
    stack.env.update(READ_MODELS="records,history", HISTORY_PAGE_MAX=str(PAGE_MAX))
    api = await stack.launch("api")
    await stack.launch("projector")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        # Two pages and one entry more (9 = 2 x 4 + 1), with another key's commands between.
        written = await write_key(client, "h/1", 5)
        await write_key(client, "other", 3)
        written += await write_key(client, "h/1", 4)
        last = written[-1]["position"]
        pages, before = [], None
        for _ in range(5):
            params = {"position": last, "timeout": 5}
            if before is not None:
                params["before"] = before
            answer = await client.get("/read/h/1/history", params=params)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["position_reached"] is True and body["key"] == "h/1"
            pages.append(body["entries"])
            before = body["next_before"]
            if before is None:
                break
        assert [len(page) for page in pages] == [PAGE_MAX, PAGE_MAX, 1]
        entries = [entry for page in pages for entry in page]
        assert [e["position"] for e in entries] == [w["position"] for w in reversed(written)]
        assert [e["value"] for e in entries] == [f"v{i}" for i in (3, 2, 1, 0, 4, 3, 2, 1, 0)]
        assert [e["event_type"] for e in entries] == [w["event_type"] for w in reversed(written)]
        assert [e["created_at"] for e in entries] == [w["created_at"] for w in reversed(written)]
        # The bound: HISTORY_PAGE_MAX is accepted, one more is refused with the limit named.
        at_max = await client.get("/read/h/1/history", params={"limit": PAGE_MAX})
        assert len(at_max.json()["entries"]) == PAGE_MAX
        over = await client.get("/read/h/1/history", params={"limit": PAGE_MAX + 1})
        assert over.status_code == 422 and "HISTORY_PAGE_MAX" in over.json()["message"]
        # Below the oldest: an empty last page. A key never written: the same.
        oldest = written[0]["position"]
        empty = (await client.get("/read/h/1/history", params={"before": oldest})).json()
        assert empty["entries"] == [] and empty["next_before"] is None
        assert (await client.get("/read/none/history")).json()["entries"] == []
        # Without a query (the hot path's shape): still the history, not a record "h/1/history".
        plain = await client.get("/read/h/1/history")
        assert plain.status_code == 200 and len(plain.json()["entries"]) == PAGE_MAX
        assert (await client.get("/read/h/1")).json()["write_count"] == 9
    await stack.assert_converges()


async def test_history_not_enabled_answers_404_and_unknown_models_are_refused(
    stack: Stack,
) -> None:
    api = await stack.launch("api")  # READ_MODELS defaults to records
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        await write_key(client, "k", 1)
        for params in ({}, {"limit": 1}):
            answer = await client.get("/read/k/history", params=params)
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"] == "read_model_not_enabled"
            assert "READ_MODELS" in answer.json()["message"]
    for value, expected in (
        ("records,nope", "unknown read model 'nope': known models are records, history"),
        ("history", "must include 'records'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cqrs_stack.cli", "read-api", "--port", "1"],
            env={**os.environ, **stack.env, "READ_MODELS": value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "READ_MODELS" in done.stderr and expected in done.stderr, done.stderr


async def test_rebuild_model_and_verify_cover_history(stack: Stack) -> None:
    stack.env["READ_MODELS"] = "records,history"
    api = await stack.launch("api")
    await stack.launch("projector")
    await write_many(api.url, 200, keys=10)
    await stack.assert_converges()
    verified = cqrs_stack(stack, "verify")
    assert verified.returncode == 0 and "(records, history)" in verified.stdout
    async with stack.read_engine.begin() as conn:
        await conn.execute(text("DELETE FROM history WHERE key = 'k3'"))
        await conn.execute(text("UPDATE history SET value = 'x' WHERE key = 'k4'"))
        await conn.execute(text("UPDATE records SET value = 'damaged' WHERE key = 'k5'"))
    differs = cqrs_stack(stack, "verify")
    assert differs.returncode == 1
    assert "history: missing key ('k3'," in differs.stdout
    assert "history: key ('k4'," in differs.stdout and "records: key 'k5'" in differs.stdout
    rebuilt = cqrs_stack(stack, "rebuild", "--model", "history")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt from 200 commands (history)" in rebuilt.stdout
    still = cqrs_stack(stack, "verify")
    assert still.returncode == 1 and "history:" not in still.stdout  # records left alone
    assert cqrs_stack(stack, "rebuild", "--model", "nope").returncode == 2
    assert cqrs_stack(stack, "rebuild").returncode == 0  # every enabled model
    await stack.assert_converges(timeout=5)


async def test_the_projector_prunes_its_ledgers_while_duplicates_arrive(stack: Stack) -> None:
    stack.env.update(READ_MODELS="records,history", LEDGER_PRUNE_INTERVAL="0.2")
    api = await stack.launch("api")
    await stack.launch("projector", LEDGER_PRUNE_STEP="100")
    await write_many(api.url, 600, keys=20)
    await stack.assert_converges()

    async def pruned_to_the_top() -> bool:
        top = await stack.scalar(stack.write_engine, "SELECT max(id) FROM commands")
        for ledger in ("applied_commands", "history_applied"):
            mark, rows = await stack.scalar(
                stack.read_engine,
                f"SELECT ARRAY[(SELECT position FROM {ledger}_watermark),"
                f" (SELECT count(*) FROM {ledger})]",
            )
            if (mark, rows) != (top, 0):
                return False
        return True

    await wait_until(pruned_to_the_top, 20, "both ledgers pruned up to the last command")
    stream = stack.settings.event_stream_name
    for _, fields in reversed(await stack.redis.xrange(stream)):  # every event again, reversed
        await stack.redis.xadd(stream, fields)
    await write_many(api.url, 100, prefix="after", keys=5)
    await stack.assert_converges()
    # Round after round: a round that pruned rows is followed by the next one an interval on.
    await wait_until(pruned_to_the_top, 20, "the ledgers pruned again, past the later writes")
    assert await stack.scalar(stack.read_engine, "SELECT sum(write_count) FROM records") == 700
    assert await stack.scalar(stack.read_engine, "SELECT count(*) FROM history") == 700
    async with httpx.AsyncClient(base_url=api.url) as client:
        stats = (await client.get("/stats")).json()
    assert stats["lag_events"] == 0 and stats["last_projected_position"] >= 700
    status = cqrs_stack(stack, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"applied": 700' in status.stdout

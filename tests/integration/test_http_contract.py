"""The original service's scenarios, black-box over HTTP against live processes.

Each test runs the combined API (as clients of the original service use it) and a projector
on fresh databases of two separate PostgreSQL servers and a real Redis. The ``test_original_*``
tests state, in our words, every HTTP expectation of the original service's own suite, and run
with hot paths on and off (one stack per path, shared by those tests).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from cqrs_stack.localservers import PostgresServer, RedisServer
from tests.fixtures.stack import ServiceProcess, Stack, open_stack, wait_until


@pytest_asyncio.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the combined API on :port, with a projector running beside it."""
    service: ServiceProcess = await stack.launch("api")
    await stack.launch("projector")
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        yield client


async def read_when_visible(api: httpx.AsyncClient, key: str, write_count: int = 1) -> dict:
    """Poll GET /read/{key} until the key shows ``write_count`` writes (eventual consistency)."""
    seen: dict = {}

    async def visible() -> bool:
        nonlocal seen
        seen = (await api.get(f"/read/{key}")).json()
        return seen.get("success") is True and seen["write_count"] >= write_count

    await wait_until(visible, 10, f"{key} to be projected")
    return seen


async def test_health(api: httpx.AsyncClient) -> None:
    answer = await api.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "healthy"


async def test_readiness_checks_databases_and_redis(api: httpx.AsyncClient) -> None:
    answer = await api.get("/ready")
    assert answer.status_code == 200
    assert answer.json()["checks"] == {
        "write_db": "ok",
        "read_db": "ok",
        "redis": "ok",
        "command-writer": "ok",
        "publisher": "ok",
        "idempotency-expiry": "ok",
        "read-counter": "ok",
    }


async def test_write_answers_with_event_and_position(api: httpx.AsyncClient) -> None:
    answer = await api.post("/write", json={"key": "user:1", "value": "alice"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert body["key"] == "user:1"
    assert body["message"] == "Command written and event published"
    assert body["event_type"] == "RecordCreated"
    assert body["queued"] is False
    assert "-" in body["event_id"]  # a Redis stream id such as 1700000000000-0
    assert body["position"] >= 1


async def test_write_is_stored_in_the_write_db(api: httpx.AsyncClient, stack: Stack) -> None:
    body = (await api.post("/write", json={"key": "k", "value": "v1"})).json()
    row = await stack.scalar(
        stack.write_engine,
        "SELECT key || '=' || value || '/' || event_type FROM commands WHERE id = :id",
        id=body["position"],
    )
    assert row == "k=v1/RecordCreated"


async def test_projection_reaches_the_read_db(api: httpx.AsyncClient, stack: Stack) -> None:
    await api.post("/write", json={"key": "p", "value": "projected"})

    async def in_read_db() -> bool:
        value = await stack.scalar(stack.read_engine, "SELECT value FROM records WHERE key = 'p'")
        return value == "projected"

    await wait_until(in_read_db, 10, "the record in the read DB")


async def test_read_returns_the_record(api: httpx.AsyncClient) -> None:
    await api.post("/write", json={"key": "r", "value": "hello"})
    body = await read_when_visible(api, "r")
    assert body["value"] == "hello"
    assert body["from_read_db"] is True
    assert body["write_count"] == 1
    assert set(body) >= {"created_at", "updated_at", "read_count", "write_count"}


async def test_missing_key(api: httpx.AsyncClient) -> None:
    answer = await api.get("/read/never-written")
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is False
    assert body["message"].startswith("Key not found")
    assert body["from_read_db"] is True


async def test_update_with_put(api: httpx.AsyncClient) -> None:
    await api.post("/write", json={"key": "u", "value": "old"})
    answer = await api.put("/write", json={"key": "u", "value": "new"})
    assert answer.status_code == 200
    assert answer.json()["event_type"] == "RecordUpdated"
    body = await read_when_visible(api, "u", write_count=2)
    assert body["value"] == "new"
    assert body["updated_at"] > body["created_at"]


async def test_write_count_counts_every_write(api: httpx.AsyncClient) -> None:
    for i in range(5):
        await api.put("/write", json={"key": "wc", "value": str(i)})
    body = await read_when_visible(api, "wc", write_count=5)
    assert body["write_count"] == 5
    assert body["value"] == "4"


async def test_read_count_rises_with_every_read(api: httpx.AsyncClient, stack: Stack) -> None:
    await api.post("/write", json={"key": "rc", "value": "x"})
    first = (await read_when_visible(api, "rc"))["read_count"]
    counts = [(await api.get("/read/rc")).json()["read_count"] for _ in range(5)]
    assert counts == [first + i for i in range(1, 6)]

    async def flushed() -> bool:
        stored = await stack.scalar(
            stack.read_engine, "SELECT read_count FROM records WHERE key = 'rc'"
        )
        return stored == first + 5

    await wait_until(flushed, 5, "read counts flushed to the read DB")


async def test_eventual_consistency_and_position_wait(api: httpx.AsyncClient) -> None:
    body = (await api.post("/write", json={"key": "ec", "value": "soon"})).json()
    waited = await api.get("/read/ec", params={"position": body["position"], "timeout": 5})
    assert waited.json()["position_reached"] is True
    assert waited.json()["value"] == "soon"


async def test_position_wait_is_bounded(api: httpx.AsyncClient) -> None:
    answer = await api.get("/read/nothing", params={"position": 10**12, "timeout": 0.2})
    assert answer.status_code == 200
    assert answer.json()["position_reached"] is False


async def test_stats_fields_and_counters(api: httpx.AsyncClient, stack: Stack) -> None:
    before = (await api.get("/stats")).json()
    for key in (
        "write_db_pool_size",
        "read_db_pool_size",
        "events_published",
        "events_projected",
        "read_db_records",
        "write_db_records",
    ):
        assert isinstance(before[key], int), key
    for i in range(3):
        await api.post("/write", json={"key": f"s{i}", "value": "v"})
    await stack.assert_converges()

    async def marked_published() -> bool:
        # Commands are marked published off the request path, just after their XADD.
        stats = (await api.get("/stats")).json()
        return stats["events_published"] == before["events_published"] + 3

    await wait_until(marked_published, 10, "events_published to count the 3 writes")
    after = (await api.get("/stats")).json()
    assert after["write_db_records"] == before["write_db_records"] + 3
    assert after["events_published"] == before["events_published"] + 3
    assert after["events_projected"] == before["events_projected"] + 3
    assert after["read_db_records"] == before["read_db_records"] + 3
    assert after["lag_events"] == 0
    assert after["last_projected_position"] == after["last_written_position"]


async def test_several_writes_to_one_key(api: httpx.AsyncClient, stack: Stack) -> None:
    positions = []
    for i in range(10):
        positions.append((await api.post("/write", json={"key": "same", "value": f"v{i}"})).json())
    assert [p["position"] for p in positions] == sorted(p["position"] for p in positions)
    body = await read_when_visible(api, "same", write_count=10)
    assert body["value"] == "v9"
    await stack.assert_converges()


async def test_many_keys(api: httpx.AsyncClient, stack: Stack) -> None:
    for i in range(200):
        answer = await api.post("/write", json={"key": f"many:{i}", "value": str(i)})
        assert answer.status_code == 200
    await stack.assert_converges()
    assert await stack.scalar(stack.read_engine, "SELECT count(*) FROM records") == 200
    assert (await api.get("/read/many:123")).json()["value"] == "123"


async def test_the_two_databases_are_separate(stack: Stack) -> None:
    write_port = await stack.scalar(stack.write_engine, "SELECT current_setting('port')")
    read_port = await stack.scalar(stack.read_engine, "SELECT current_setting('port')")
    assert write_port != read_port  # two servers, not two schemas
    assert await stack.scalar(stack.write_engine, "SELECT to_regclass('records')") is None
    assert await stack.scalar(stack.read_engine, "SELECT to_regclass('commands')") is None


async def test_metrics_in_prometheus_format(api: httpx.AsyncClient) -> None:
    await api.post("/write", json={"key": "m", "value": "v"})
    text = (await api.get("/metrics")).text
    assert "# TYPE cqrs_http_requests_total counter" in text
    assert 'route="/write"' in text


async def test_hot_paths_answer_as_the_routes_do(api: httpx.AsyncClient) -> None:
    # A plain read and a valid write skip the framework (hot_paths.py); a read with a query
    # goes through the FastAPI route. Both must give the same answer and the same metrics.
    write = await api.post("/write", json={"key": "hot", "value": 'ü\n"x"'})
    assert write.headers["content-type"] == "application/json"
    position = write.json()["position"]
    routed = await api.get("/read/hot", params={"position": position, "timeout": 5})
    direct = await api.get("/read/hot")
    assert direct.headers["content-type"] == routed.headers["content-type"]
    routed_body, direct_body = routed.json(), direct.json()
    assert routed_body.pop("position_reached") is True
    assert direct_body.pop("position_reached") is None
    assert direct_body.pop("read_count") == routed_body.pop("read_count") + 1
    assert direct_body == routed_body
    assert direct_body["value"] == 'ü\n"x"'
    assert write.json()["created_at"] == direct_body["created_at"]

    metrics = (await api.get("/metrics")).text
    assert 'cqrs_http_requests_total{method="POST",route="/write",status="200"}' in metrics
    assert 'cqrs_http_requests_total{method="GET",route="/read/{key:key}",status="200"}' in metrics


async def test_with_hot_paths_off_the_routes_answer_alike(stack: Stack) -> None:
    # HOT_PATHS=false: every request through FastAPI; same answers, same metrics labels.
    service = await stack.launch("api", HOT_PATHS="false")
    await stack.launch("projector")
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        write = await client.post("/write", json={"key": "cold", "value": "v"})
        assert write.status_code == 200 and write.json()["queued"] is False
        waited = await client.get(
            "/read/cold", params={"position": write.json()["position"], "timeout": 5}
        )
        plain = (await client.get("/read/cold")).json()
        assert plain["value"] == "v" and plain["position_reached"] is None
        assert plain["read_count"] == waited.json()["read_count"] + 1
        assert plain["created_at"] == write.json()["created_at"]
        assert (await client.get("/health")).json()["status"] == "healthy"
        metrics = (await client.get("/metrics")).text
    assert 'cqrs_http_requests_total{method="POST",route="/write",status="200"}' in metrics
    assert 'route="/read/{key:key}",status="200"' in metrics


async def test_concurrent_reads_each_get_their_own_answer(api: httpx.AsyncClient) -> None:
    # Concurrent reads share one SELECT (read_db.RecordReader): each must still get its own
    # key's record, a missing key its own not-found answer, and every read must be counted.
    positions = [
        (await api.post("/write", json={"key": f"c{i}", "value": f"v{i}"})).json()["position"]
        for i in range(8)
    ]
    await api.get("/read/c7", params={"position": positions[-1], "timeout": 5})
    keys = [f"c{i % 8}" for i in range(48)] + [f"absent{i}" for i in range(8)]
    answers = await asyncio.gather(*(api.get(f"/read/{key}") for key in keys))
    for key, answer in zip(keys, answers, strict=True):
        body = answer.json()
        assert body["key"] == key
        if key.startswith("absent"):
            assert body["success"] is False
        else:
            assert body["value"] == f"v{key[1:]}"
    final = (await api.get("/read/c0")).json()
    assert final["read_count"] == 6 + 1  # six concurrent reads and this one


async def test_published_marks_follow_the_writes(api: httpx.AsyncClient, stack: Stack) -> None:
    # A batch's published mark rides in the next batch's transaction, or is written alone
    # after a short idle delay: well before the relay's 2 s grace, so nothing is sent twice.
    answers = await asyncio.gather(
        *(api.post("/write", json={"key": f"m{i}", "value": "v"}) for i in range(40))
    )
    assert all(a.json()["queued"] is False for a in answers)

    async def all_marked() -> bool:
        return (
            await stack.scalar(
                stack.write_engine, "SELECT count(*) FROM commands WHERE NOT published"
            )
            == 0
        )

    await wait_until(all_marked, 1.5, "every command to be marked published")
    assert await stack.redis.xlen(stack.settings.event_stream_name) == 40


async def test_write_and_read_apis_run_as_separate_processes(stack: Stack) -> None:
    writer = await stack.launch("write-api")
    reader = await stack.launch("read-api")
    await stack.launch("projector")
    async with httpx.AsyncClient(timeout=10) as client:
        # The other side's routes: 405 with an empty Allow (test_newcomer.py has the details).
        assert (await client.get(f"{writer.url}/read/x")).status_code == 405
        assert (await client.post(f"{reader.url}/write", json={"key": "x"})).status_code == 405
        body = (await client.post(f"{writer.url}/write", json={"key": "x", "value": "1"})).json()
        read = await client.get(
            f"{reader.url}/read/x", params={"position": body["position"], "timeout": 5}
        )
        assert read.json()["value"] == "1"


# The original service's own suite, as its clients rely on it: each of its HTTP expectations,
# asserted on both paths (hot paths on and off). One stack and one API per path for them all.


@dataclass
class Original:
    """The combined API of one path (with a projector), as the original service's clients see it."""

    client: httpx.AsyncClient
    stack: Stack


@pytest_asyncio.fixture(scope="module", params=["true", "false"], ids=["hot", "cold"])
async def original(
    request: pytest.FixtureRequest,
    write_pg: PostgresServer,
    read_pg: PostgresServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Original]:
    names = f"orig{os.getpid()}_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("original")
    async with open_stack(write_pg, read_pg, redis_server, names, workdir) as stack:
        service = await stack.launch("api", HOT_PATHS=request.param)
        await stack.launch("projector")
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            yield Original(client, stack)


async def test_original_health_names_the_layer(original: Original) -> None:
    answer = await original.client.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "healthy"
    assert answer.json()["layer"] == "7-cqrs"


async def test_original_post_answers_and_stores(original: Original) -> None:
    answer = await original.client.post("/write", json={"key": "o:post", "value": "first"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True
    assert body["key"] == "o:post"
    assert body["event_id"] is not None
    assert "event published" in body["message"].lower()
    # In the write DB as soon as it is answered: the newest command of the key, key and value.
    newest = await original.stack.scalar(
        original.stack.write_engine,
        "SELECT key || '=' || value FROM commands WHERE key = 'o:post' ORDER BY id DESC LIMIT 1",
    )
    assert newest == "o:post=first"


async def test_original_put_answers_updated(original: Original) -> None:
    await original.client.post("/write", json={"key": "o:put", "value": "v1"})
    answer = await original.client.put("/write", json={"key": "o:put", "value": "v2"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True
    assert body["event_id"] is not None
    assert body["message"] == "Command updated and event published"
    assert (await read_when_visible(original.client, "o:put", 2))["value"] == "v2"


async def test_original_read_of_a_projected_key(original: Original) -> None:
    await original.client.post("/write", json={"key": "o:read", "value": "shown"})
    await read_when_visible(original.client, "o:read")
    answer = await original.client.get("/read/o:read")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["success"], body["key"], body["value"]) == (True, "o:read", "shown")
    assert body["from_read_db"] is True
    assert body["created_at"] is not None and body["updated_at"] is not None


async def test_original_read_of_an_unknown_key(original: Original) -> None:
    answer = await original.client.get("/read/o:never_written_12345")
    assert answer.status_code == 200
    assert answer.json()["success"] is False
    assert "not found" in answer.json()["message"].lower()


async def test_original_counts_rise(original: Original) -> None:
    for i in range(3):
        await original.client.post("/write", json={"key": "o:counts", "value": f"v{i}"})
    first = (await read_when_visible(original.client, "o:counts", 3))["read_count"]
    later = [(await original.client.get("/read/o:counts")).json()["read_count"] for _ in range(2)]
    assert first < later[0] < later[1]

    async def stored_counts() -> bool:
        row = await original.stack.scalar(
            original.stack.read_engine,
            "SELECT write_count::text || '/' || (read_count > 0)::text FROM records"
            " WHERE key = 'o:counts'",
        )
        return row == "3/true"

    await wait_until(stored_counts, 10, "write_count 3 and the reads stored in the read DB")


async def test_original_last_write_wins(original: Original) -> None:
    for i in range(5):
        answer = await original.client.post("/write", json={"key": "o:multi", "value": f"v_{i}"})
        assert answer.status_code == 200
    assert (await read_when_visible(original.client, "o:multi", 5))["value"] == "v_4"


async def test_original_many_keys_reach_the_read_db(original: Original) -> None:
    for i in range(10):
        answer = await original.client.post("/write", json={"key": f"o:many_{i}", "value": "v"})
        assert answer.status_code == 200

    async def all_there() -> bool:
        found = await original.stack.scalar(
            original.stack.read_engine, "SELECT count(*) FROM records WHERE key LIKE 'o:many\\_%'"
        )
        return found == 10

    await wait_until(all_there, 10, "the 10 keys in the read DB")


async def test_original_read_model_columns(original: Original) -> None:
    await original.client.post("/write", json={"key": "o:columns", "value": "denormalised"})
    await read_when_visible(original.client, "o:columns")
    async with original.stack.read_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT key, value, created_at, updated_at, read_count, write_count"
                    " FROM records WHERE key = 'o:columns'"
                )
            )
        ).one()
    assert row[:2] == ("o:columns", "denormalised")
    assert row[2] is not None and row[3] is not None
    assert isinstance(row[4], int) and isinstance(row[5], int)


async def test_original_stats(original: Original) -> None:
    answer = await original.client.get("/stats")
    assert answer.status_code == 200
    before = answer.json()
    for name in (
        "write_db_pool_size",
        "read_db_pool_size",
        "events_published",
        "events_projected",
        "read_db_records",
        "write_db_records",
    ):
        assert isinstance(before[name], int), name
    assert before["write_db_pool_size"] >= 0 and before["read_db_pool_size"] >= 0
    await original.client.post("/write", json={"key": "o:stats", "value": "v"})

    async def projected() -> bool:
        stats = (await original.client.get("/stats")).json()
        return bool(stats["events_projected"] > before["events_projected"])

    await wait_until(projected, 10, "events_projected to count the write")


async def test_original_tables_live_in_their_own_database(original: Original) -> None:
    stack = original.stack
    tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = :name"
    assert await stack.scalar(stack.write_engine, tables, name="commands") == 1
    assert await stack.scalar(stack.read_engine, tables, name="records") == 1
    assert await stack.scalar(stack.write_engine, tables, name="records") == 0
    assert await stack.scalar(stack.read_engine, tables, name="commands") == 0

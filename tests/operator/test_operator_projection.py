"""ProjectionStalled / ProjectionDegraded against the real API server, with the operator running
and a real stream (no projector pod runs here: entries added stay undelivered)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import asyncpg
from kubernetes_asyncio import client
from redis.asyncio import Redis

from cqrs_operator.provisioning import acl_rules
from cqrs_stack import diagnosis
from cqrs_stack.config import Settings
from cqrs_stack.stream import dead_letter_marks, dead_letter_once
from tests.operator.fixtures_operator import Env


def _conditions(obj: dict[str, object]) -> dict[str, dict[str, str]]:
    found = (obj.get("status") or {}).get("conditions") or []  # type: ignore[union-attr]
    return {c["type"]: c for c in found}


async def test_projection_stalled_while_nobody_reads_then_false_once_consumed(env: Env) -> None:
    await env.stacks.create(env.manifest("stall"))
    await env.stacks.wait_ready("stall", env.operator)
    await env.stacks.wait_condition(
        "stall", "ProjectionStalled", "False", "Progressing", env.operator
    )
    redis = Redis.from_url(env.redis.url)
    stream = f"{env.namespace}.stall-events"
    try:
        for i in range(5):
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})
        obj = await env.stacks.wait_condition(
            "stall", "ProjectionStalled", "True", "NoConsumerReading", env.operator
        )
        conds = _conditions(obj)
        assert conds["ProjectionStalled"]["message"].startswith(
            "no consumer reads the stream: 5 entries not acknowledged (5 undelivered)"
        )
        assert conds["ProjectionDegraded"]["status"] == "False"
        assert conds["Ready"]["status"] == "True"  # serving: the backlog is reported beside it
        projector = obj["status"]["projector"]
        assert projector["health"]["verdict"] == "stalled"
        assert projector["health"]["lagEvents"] == 5
        assert projector["health"]["lagSeconds"] >= 0
        assert projector["progress"]["marker"]
        assert projector["lag"] == 5

        await redis.xgroup_setid(stream, "projectors", "$")  # the backlog is consumed
        obj = await env.stacks.wait_condition(
            "stall", "ProjectionStalled", "False", "Progressing", env.operator
        )
        assert obj["status"]["projector"]["health"]["verdict"] == "ok"
        assert _conditions(obj)["ProjectionDegraded"]["reason"] == "KeepsUp"
    finally:
        await redis.aclose()


async def test_the_stacks_redis_acl_user_may_read_the_diagnosis(redis_server: Any) -> None:
    """The pods of an isolated stack log in as its ACL user: every command of the health
    reading (and of dead letters) is among the user's, on its stream's keys."""
    stream = f"acl-diag-{uuid.uuid4().hex[:8]}"
    admin = Redis.from_url(redis_server.url)
    user = f"u-{stream}"
    password = "diagnosis-pass-1"
    try:
        await admin.execute_command(
            "ACL", "SETUSER", user, *acl_rules(stream, [password], set(), exact=True)
        )
        await admin.xgroup_create(stream, "projectors", id="0", mkstream=True)
        await admin.xadd(stream, {"type": "RecordCreated"})
        await admin.xadd(f"{stream}:dead", {"dead_letter_reason": "x"})
        await admin.xreadgroup("projectors", "p-1", {stream: ">"}, count=1)
        await admin.xadd(stream, {"type": "RecordCreated"})
        host = redis_server.url.split("://", 1)[1]
        pods = Redis.from_url(f"redis://{user}:{password}@{host}")
        try:
            health = await diagnosis.read_stream(pods, stream, "projectors", 30.0, 5.0)
            dead = await diagnosis.read_dead_letters(pods, f"{stream}:dead", 5.0)
        finally:
            await pods.aclose()
        assert health.reachable, health.error
        assert (health.pending, health.undelivered) == (1, 1)
        assert health.consumers[0].oldest_pending is not None
        assert dead is not None and dead.count == 1
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.delete(stream, f"{stream}:dead")
        await admin.aclose()


async def test_the_stacks_redis_acl_user_may_dead_letter_as_the_services_do(
    redis_server: Any,
) -> None:
    """The pods' ACL user may write the dead-letter stream and its marks under the keys the
    services use (stream.dead_letter_marks): a command dead-lettered twice is added once."""
    stream = f"acl-dead-{uuid.uuid4().hex[:8]}"
    settings = Settings(event_stream_name=stream)
    admin = Redis.from_url(redis_server.url)
    user, password = f"u-{stream}", "dead-letter-pass-1"
    try:
        await admin.execute_command(
            "ACL", "SETUSER", user, *acl_rules(stream, [password], set(), exact=True)
        )
        host = redis_server.url.split("://", 1)[1]
        pods = Redis.from_url(f"redis://{user}:{password}@{host}")
        try:
            fields: dict[str, bytes | str] = {"type": "RecordCreated", "position": "7"}
            added = [
                await dead_letter_once(
                    pods, settings, fields, reason="poison", deliveries=5, consumer="p-1"
                )
                for _ in range(2)
            ]
            assert added == [True, False]
        finally:
            await pods.aclose()
        assert await admin.xlen(settings.dead_letter_stream) == 1
        assert await admin.hget(dead_letter_marks(settings), "7") == b"added"
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.delete(settings.dead_letter_stream, dead_letter_marks(settings))
        await admin.aclose()


async def test_a_transaction_pinning_the_watermark_is_named_in_the_stacks_status(env: Env) -> None:
    """The sweep's state says it passed an open write-DB transaction (as a projector's sweep
    records it: no projector pod runs here); a session of the stack's role holds that
    transaction idle: ProjectionDegraded names its xid, pid, application and state, and
    status.projector.health.catchUp lists it; once it commits, the pin is gone (and with no
    projector sweeping, the cause becomes the sweep that does not run)."""
    await env.stacks.create(env.manifest("pin"))
    await env.stacks.wait_ready("pin", env.operator)
    secret = await client.CoreV1Api(env.api).read_namespaced_secret(
        "pin-credentials", env.namespace
    )
    urls = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    holder = await asyncpg.connect(
        urls["WRITE_DB_URL"], server_settings={"application_name": "psql"}
    )
    reader = await asyncpg.connect(urls["READ_DB_URL"])
    try:
        await holder.execute("BEGIN")
        xid = await holder.fetchval("SELECT pg_current_xact_id()::text")
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        await reader.execute(
            "UPDATE projector_catchup SET watermark = $1::text::xid8, cursor_txid = $2::text::xid8,"
            " swept_at = now() + interval '1 hour' WHERE model = 'records'",
            xid,
            str(int(xid) + 1),
        )
        await reader.execute(
            "INSERT INTO projector_catchup_pending (model, txid)"
            " VALUES ('records', $1::text::xid8)",
            xid,
        )
        obj = await env.stacks.wait_condition(
            "pin", "ProjectionDegraded", "True", "WatermarkPinned", env.operator
        )
        message = _conditions(obj)["ProjectionDegraded"]["message"]
        assert message.startswith(
            f"catch-up watermark pinned by write-DB transaction {xid} (pid {pid}, app 'psql',"
            " idle in transaction for "
        ), message
        pin = obj["status"]["projector"]["health"]["catchUp"]["pinnedBy"][0]
        assert (pin["xid"], pin["pid"], pin["applicationName"]) == (xid, pid, "psql")
        assert pin["state"] == "idle in transaction" and pin["openSeconds"] >= 1
        assert _conditions(obj)["Ready"]["status"] == "True"
        await holder.execute("COMMIT")
        await reader.execute("UPDATE projector_catchup SET swept_at = now() - interval '1 hour'")
        obj = await env.stacks.wait_condition(
            "pin", "ProjectionDegraded", "True", "SweepNotRunning", env.operator
        )
        assert obj["status"]["projector"]["health"]["catchUp"]["pinnedBy"] == []
    finally:
        await holder.close()
        await reader.close()

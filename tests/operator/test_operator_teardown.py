"""One deletion tears down once, and a teardown interrupted is finished after a restart.

Against the real kube-apiserver, PostgreSQL and Redis. The interleavings are forced with
PostgreSQL locks held by the test (the operator is seen waiting on them in
pg_stat_activity), never with sleeps.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis

from tests.operator.fixtures_operator import (
    Env,
    Operator,
    database_exists,
    events,
    names,
    redis_admin_secret,
    role_exists,
    wait_until,
)


def _isolated(env: Env, name: str, fresh: str) -> dict[str, Any]:
    """A stack with deletionPolicy Delete and its own Redis ACL user."""
    manifest = env.manifest(name, fresh, deletionPolicy="Delete")
    manifest["spec"]["redis"] = {"url": env.redis.url, "adminSecret": "redis-admin"}
    return manifest


async def _operator_waits(server: Any, query_prefix: str, database: str | None = None) -> bool:
    """Whether an operator connection waits on a lock, running a query with that prefix."""
    probe = await asyncpg.connect(server.url())
    try:
        found = await probe.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE $1 || '%' AND ($2::text IS NULL OR datname = $2)",
            query_prefix,
            database,
        )
    finally:
        await probe.close()
    return bool(found)


def _teardowns(operator: Operator, namespace: str, name: str) -> int:
    started = f"stack {namespace}/{name}: teardown started"
    return sum(started in line for line in operator.log_text().splitlines())


async def _assert_torn_down(env: Env, name: str, fresh: str) -> None:
    role = names(env.namespace, name).role
    for server, db in ((env.write_pg, f"w_{fresh}"), (env.read_pg, f"r_{fresh}")):
        assert not await database_exists(server, db)
        assert not await role_exists(server, role)
    admin = Redis.from_url(env.redis.url)
    try:
        assert not await admin.exists(f"{env.namespace}.{name}-events")
        assert await admin.acl_getuser(f"cqrs.{env.namespace}.{name}") is None
    finally:
        await admin.aclose()


async def test_a_deletion_while_a_timer_reconciles_tears_down_once(env: Env) -> None:
    """kopf keeps the finalizer while the timer's reconcile exits and calls the delete
    handler again after it: the second call finds the teardown recorded and does nothing."""
    await redis_admin_secret(env.api, env.namespace)
    await env.stacks.create(_isolated(env, "once", env.fresh))
    await env.stacks.wait_ready("once", env.operator)

    # Ready may come from a timer while the creation handler still waits for a retry: let it
    # finish first, so that the reconcile blocked below is the timer's (a blocked creation
    # handler would hold kopf's processing of the deletion until the query times out).
    async def created() -> bool:
        return "Creation is processed" in env.operator.log_text()

    await wait_until(
        created, timeout=30, what="the creation handled", alive=env.operator.exit_reason
    )

    # Block the timer's next reconcile where it reads the schema version of the write DB.
    blocker = await asyncpg.connect(env.write_pg.url(f"w_{env.fresh}"))
    try:
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        await wait_until(
            lambda: _operator_waits(env.write_pg, "SELECT", f"w_{env.fresh}"),
            timeout=30,
            what="a timer reconcile blocked on schema_migrations",
            alive=env.operator.exit_reason,
        )
        await env.stacks.delete("once")

        async def teardown_waits() -> bool:
            return "teardown waits for the reconcile" in env.operator.log_text()

        await wait_until(
            teardown_waits,
            timeout=30,
            what="the teardown waiting for the reconcile",
            alive=env.operator.exit_reason,
        )
        await locked.rollback()
    finally:
        await blocker.close()

    await env.stacks.wait_gone("once", env.operator)
    await _assert_torn_down(env, "once", env.fresh)
    assert _teardowns(env.operator, env.namespace, "once") == 1, env.operator.log_tail()
    reasons = [e.reason for e in await events(env.api, env.namespace, "once")]
    assert reasons.count("Dropped") == 1 and "LeftBehind" not in reasons, reasons


async def test_a_teardown_killed_midway_is_finished_by_the_next_operator(env: Env) -> None:
    """SIGKILL while the teardown waits to drop the role (its databases already dropped):
    the restarted operator drops the rest, and nothing of the other stack."""
    await redis_admin_secret(env.api, env.namespace)
    other = f"{env.fresh}_o"
    await env.stacks.create(_isolated(env, "crash", env.fresh))
    await env.stacks.create(_isolated(env, "bystander", other))
    for name in ("crash", "bystander"):
        await env.stacks.wait_ready(name, env.operator)
    role = names(env.namespace, "crash").role

    blocker = await asyncpg.connect(env.write_pg.url())
    try:
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 100')  # its row locked
        await env.stacks.delete("crash")
        await wait_until(
            lambda: _operator_waits(env.write_pg, "DROP ROLE"),
            timeout=30,
            what="the teardown blocked on DROP ROLE",
            alive=env.operator.exit_reason,
        )
        env.operator.kill()
        # The killed operator's backend would drop the role once unblocked: end it first.
        await blocker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE 'DROP ROLE%'"
        )
        await locked.rollback()
    finally:
        await blocker.close()
    # Half done: the databases are gone, the roles, stream and ACL user are not.
    assert not await database_exists(env.write_pg, f"w_{env.fresh}")
    assert not await database_exists(env.read_pg, f"r_{env.fresh}")
    assert await role_exists(env.write_pg, role) and await role_exists(env.read_pg, role)

    second = env.start_operator()
    await env.stacks.wait_gone("crash", second)
    await _assert_torn_down(env, "crash", env.fresh)
    assert _teardowns(second, env.namespace, "crash") == 1, second.log_tail()
    reasons = [e.reason for e in await events(env.api, env.namespace, "crash")]
    assert "LeftBehind" not in reasons, reasons  # what was already gone is not "left"

    role_b = names(env.namespace, "bystander").role
    for server, db in ((env.write_pg, f"w_{other}"), (env.read_pg, f"r_{other}")):
        assert await database_exists(server, db) and await role_exists(server, role_b)
    admin = Redis.from_url(env.redis.url)
    try:
        assert await admin.exists(f"{env.namespace}.bystander-events")
        assert await admin.acl_getuser(f"cqrs.{env.namespace}.bystander") is not None
    finally:
        await admin.aclose()
    await env.stacks.wait_ready("bystander", second)

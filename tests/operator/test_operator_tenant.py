"""A tenant who may only create CqrsStacks in one namespace attacks: each attempt is refused.

The tenant cannot read Secrets, but chooses every field of the spec, the image included: so
whatever the operator reads on the stack's behalf, or hands to its pods, must have opted in.
(Another stack's databases and streams: tests/operator/test_operator_sharing.py.)
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.asyncio import Redis

from tests.operator.fixtures_operator import (
    ADMIN_SECRETS,
    Operator,
    Stacks,
    stack_manifest,
)
from tests.operator.test_operator_sharing import allow_adoption


async def test_a_token_secret_naming_the_admin_secret_is_not_handed_to_the_pods(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """The pods run the tenant's image: WRITE_API_TOKEN from the admin Secret would leak it."""
    manifest = stack_manifest("thief", fresh_names, write_pg, read_pg, redis_server.url)
    manifest["spec"]["writeApi"]["auth"] = {
        "tokenSecret": {"name": ADMIN_SECRETS[0], "key": "password"}
    }
    await stacks.create(manifest)
    obj = await stacks.wait_condition(
        "thief", "WorkloadsReady", "False", "SecretNotOptedIn", operator
    )
    assert obj["status"]["phase"] == "Failed"
    apps = client.AppsV1Api(kube_api)
    with pytest.raises(ApiException) as missing:
        await apps.read_namespaced_deployment("thief-write-api", namespace)
    assert missing.value.status == 404


async def test_a_redis_url_secret_that_did_not_opt_in_is_refused(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "someone-elses"}, "stringData": {"token": "s3cr3t-value-xyz"}},
    )
    manifest = stack_manifest("url-thief", fresh_names, write_pg, read_pg, "x")
    manifest["spec"]["redis"] = {"urlSecret": {"name": "someone-elses", "key": "token"}}
    await stacks.create(manifest)
    await stacks.wait_condition("url-thief", "StreamReady", "False", "SecretNotOptedIn", operator)
    with pytest.raises(ApiException) as missing:  # nothing was copied anywhere
        await core.read_namespaced_secret("url-thief-credentials", namespace)
    assert missing.value.status == 404


async def test_adopt_alone_does_not_take_an_unmarked_database_of_the_server(
    stacks: Stacks,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """An application's database on the shared server, unknown to any stack."""
    admin = await asyncpg.connect(write_pg.url())
    try:
        await admin.execute(f"CREATE DATABASE w_{fresh_names}")
        await stacks.create(
            stack_manifest("taker", fresh_names, write_pg, read_pg, redis_server.url, adopt=True)
        )
        obj = await stacks.wait_condition(
            "taker", "DatabasesReady", "False", "AdoptionNotAllowed", operator
        )
        assert (
            "cqrs.dev/allow-adopt"
            in {c["type"]: c for c in obj["status"]["conditions"]}["DatabasesReady"]["message"]
        )
        owner = await admin.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
            f"w_{fresh_names}",
        )
        assert owner == "postgres"
    finally:
        await admin.close()


@pytest.mark.parametrize("database", ["postgres", "template1"])
async def test_a_system_database_is_refused_by_the_api_server(
    stacks: Stacks, write_pg: Any, read_pg: Any, fresh_names: str, database: str
) -> None:
    manifest = stack_manifest("sys", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    manifest["spec"]["databases"]["write"]["database"] = database
    manifest["spec"]["adopt"] = True
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422
    assert "system database" in refused.value.body


async def test_a_stream_named_after_another_stacks_dead_letters_is_refused(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    await stacks.create(stack_manifest("victim", fresh_names, write_pg, read_pg, redis_server.url))
    await stacks.wait_ready("victim", operator)
    dead = f"{namespace}.victim-events:dead"
    redis = Redis.from_url(redis_server.url)
    try:
        await redis.xadd(dead, {"type": "RecordCreated", "position": "7", "value": "private"})
        await allow_adoption(kube_api, namespace)  # even where the platform allows adoption
        await stacks.create(
            stack_manifest(
                "snoop",
                f"{fresh_names}_s",
                write_pg,
                read_pg,
                redis_server.url,
                adopt=True,
                stream={"name": dead},
            )
        )
        obj = await stacks.wait_condition(
            "snoop", "StreamReady", "False", "OwnedByAnotherStack", operator
        )
        assert obj["status"]["phase"] == "Failed"
        assert await redis.get(f"{dead}:owner") is None  # not marked as the snoop's
        assert await redis.xinfo_groups(dead) == []  # no group of the snoop's on it
    finally:
        await redis.aclose()


async def test_a_stack_named_after_another_applications_objects_takes_nothing_over(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """Stack "loot" would own loot-credentials and loot-write-api: another application's
    Secret and Deployment of those names are neither read, handed to pods, nor overwritten."""
    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    their_password = "TheirPassword_0123456789abcdef"
    await core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "loot-credentials"}, "stringData": {"password": their_password}},
    )
    await stacks.create(stack_manifest("loot", fresh_names, write_pg, read_pg, redis_server.url))
    obj = await stacks.wait_condition("loot", "WorkloadsReady", "False", "ChildNotOwned", operator)
    assert obj["status"]["phase"] == "Failed"
    secret = await core.read_namespaced_secret("loot-credentials", namespace)
    assert set(secret.data) == {"password"} and not secret.metadata.owner_references
    assert not await role_logs_in_anywhere(write_pg, their_password)

    await core.delete_namespaced_secret("loot-credentials", namespace)
    await apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "loot-write-api"},
            "spec": {
                "selector": {"matchLabels": {"app": "theirs"}},
                "template": {
                    "metadata": {"labels": {"app": "theirs"}},
                    "spec": {"containers": [{"name": "theirs", "image": "their-app:1"}]},
                },
            },
        },
    )
    await stacks.wait_condition("loot", "WorkloadsReady", "False", "ChildNotOwned", operator)
    theirs = await apps.read_namespaced_deployment("loot-write-api", namespace)
    assert theirs.spec.template.spec.containers[0].image == "their-app:1"
    assert not theirs.metadata.owner_references


async def role_logs_in_anywhere(server: Any, password: str) -> bool:
    """Whether any role of ``server`` was given ``password`` (it must not have been)."""
    admin = await asyncpg.connect(server.url())
    try:
        roles = [r["rolname"] for r in await admin.fetch("SELECT rolname FROM pg_roles")]
    finally:
        await admin.close()
    for role in roles:
        try:
            conn = await asyncpg.connect(server.url("postgres", role, password))
        except (asyncpg.PostgresError, OSError):
            continue
        await conn.close()
        return True
    return False

"""A tenant who may only create CqrsStacks in one namespace attacks: each attempt is refused.

The tenant cannot read Secrets, but chooses every field of the spec, the image included: so
whatever the operator reads on the stack's behalf, or hands to its pods, must have opted in.
(Another stack's databases and streams: tests/operator/test_operator_sharing.py.)
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from tests.operator.fixtures_operator import (
    ADMIN_SECRETS,
    Env,
    Stacks,
    admin_metadata,
    allow_adoption,
    create_secret,
    database_exists,
    names,
    redis_admin_secret,
    secret_data,
    stack_manifest,
)


async def test_a_token_secret_naming_the_admin_secret_is_not_handed_to_the_pods(
    env: Env,
) -> None:
    """The pods run the tenant's image: WRITE_API_TOKEN from the admin Secret would leak it."""
    manifest = env.manifest("thief")
    manifest["spec"]["writeApi"]["auth"] = {
        "tokenSecret": {"name": ADMIN_SECRETS[0], "key": "password"}
    }
    await env.stacks.create(manifest)
    obj = await env.stacks.wait_condition(
        "thief", "WorkloadsReady", "False", "SecretNotOptedIn", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    apps = client.AppsV1Api(env.api)
    with pytest.raises(ApiException) as missing:
        await apps.read_namespaced_deployment("thief-write-api", env.namespace)
    assert missing.value.status == 404


async def test_a_redis_url_secret_that_did_not_opt_in_is_refused(
    env: Env,
) -> None:
    core = client.CoreV1Api(env.api)
    await core.create_namespaced_secret(
        env.namespace,
        {"metadata": {"name": "someone-elses"}, "stringData": {"token": "s3cr3t-value-xyz"}},
    )
    manifest = env.manifest("url-thief", redis_url="x")
    manifest["spec"]["redis"] = {"urlSecret": {"name": "someone-elses", "key": "token"}}
    await env.stacks.create(manifest)
    await env.stacks.wait_condition(
        "url-thief", "StreamReady", "False", "SecretNotOptedIn", env.operator
    )
    with pytest.raises(ApiException) as missing:  # nothing was copied anywhere
        await core.read_namespaced_secret("url-thief-credentials", env.namespace)
    assert missing.value.status == 404


async def test_adopt_alone_does_not_take_an_unmarked_database_of_the_server(
    env: Env,
) -> None:
    """An application's database on the shared server, unknown to any stack."""
    admin = await asyncpg.connect(env.write_pg.url())
    try:
        await admin.execute(f"CREATE DATABASE w_{env.fresh}")
        await env.stacks.create(env.manifest("taker", adopt=True))
        obj = await env.stacks.wait_condition(
            "taker", "DatabasesReady", "False", "AdoptionNotAllowed", env.operator
        )
        assert (
            "cqrs.dev/allow-adopt"
            in {c["type"]: c for c in obj["status"]["conditions"]}["DatabasesReady"]["message"]
        )
        owner = await admin.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
            f"w_{env.fresh}",
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
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("victim"))
    await env.stacks.wait_ready("victim", env.operator)
    dead = f"{env.namespace}.victim-events:dead"
    redis = Redis.from_url(env.redis.url)
    try:
        await redis.xadd(dead, {"type": "RecordCreated", "position": "7", "value": "private"})
        await allow_adoption(env.api, env.namespace)  # even where the platform allows adoption
        await env.stacks.create(
            env.manifest(
                "snoop",
                f"{env.fresh}_s",
                adopt=True,
                stream={"name": dead},
            )
        )
        obj = await env.stacks.wait_condition(
            "snoop", "StreamReady", "False", "ReservedName", env.operator
        )
        assert obj["status"]["phase"] == "Failed"
        assert await redis.get(f"{dead}:owner") is None  # not marked as the snoop's
        assert await redis.xinfo_groups(dead) == []  # no group of the snoop's on it
    finally:
        await redis.aclose()


async def test_a_stack_named_after_another_applications_objects_takes_nothing_over(
    env: Env,
) -> None:
    """Stack "loot" would own loot-credentials and loot-write-api: another application's
    Secret and Deployment of those names are neither read, handed to pods, nor overwritten."""
    core, apps = client.CoreV1Api(env.api), client.AppsV1Api(env.api)
    their_password = "TheirPassword_0123456789abcdef"
    await core.create_namespaced_secret(
        env.namespace,
        {"metadata": {"name": "loot-credentials"}, "stringData": {"password": their_password}},
    )
    await env.stacks.create(env.manifest("loot"))
    obj = await env.stacks.wait_condition(
        "loot", "WorkloadsReady", "False", "ChildNotOwned", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    secret = await core.read_namespaced_secret("loot-credentials", env.namespace)
    assert set(secret.data) == {"password"} and not secret.metadata.owner_references
    assert not await role_logs_in_anywhere(env.write_pg, their_password)

    await core.delete_namespaced_secret("loot-credentials", env.namespace)
    await apps.create_namespaced_deployment(
        env.namespace,
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
    await env.stacks.wait_condition(
        "loot", "WorkloadsReady", "False", "ChildNotOwned", env.operator
    )
    theirs = await apps.read_namespaced_deployment("loot-write-api", env.namespace)
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


# ------------------------------------------------------------------- where logins may go


class FakeServer:
    """A TCP listener on 127.0.0.1 that records what its clients send; ``answer`` maps each
    packet received to the bytes sent back (b"": nothing, the client waits)."""

    def __init__(self, answer: Callable[[bytes], bytes] = lambda _: b"") -> None:
        self.answer = answer
        self.received = bytearray()
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port: int = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while len(self.received) < 1 << 16:  # bounded: a client never fills the test
                data = await asyncio.wait_for(reader.read(4096), 30)
                if not data:
                    break
                self.received += data
                if reply := self.answer(data):
                    writer.write(reply)
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *_: object) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def pg_asking_cleartext(packet: bytes) -> bytes:
    """A PostgreSQL server that refuses TLS and asks for the password in clear."""
    if packet == SSL_REQUEST:
        return b"N"
    if packet[:1] == b"p":  # the password: no answer, the client times out
        return b""
    return b"R" + struct.pack("!ii", 8, 3)  # AuthenticationCleartextPassword


async def test_the_postgresql_admin_login_is_never_sent_to_redis(
    env: Env,
) -> None:
    """spec.redis.adminSecret naming the PostgreSQL admin Secret, at a Redis of the tenant's:
    refused before a byte is sent (AdminSecretWrongKind); a Redis admin Secret goes only to
    the hosts its cqrs.dev/admin-hosts names (AdminHostNotAllowed)."""
    async with FakeServer() as fake:
        url = f"redis://127.0.0.1:{fake.port}/0"
        manifest = env.manifest("redis-thief", redis_url=url)
        manifest["spec"]["redis"]["adminSecret"] = ADMIN_SECRETS[0]
        await env.stacks.create(manifest)
        await env.stacks.wait_condition("redis-thief", "StreamReady", "False", None, env.operator)
        assert env.write_pg.password.encode() not in fake.received
        await env.stacks.wait_condition(
            "redis-thief", "StreamReady", "False", "AdminSecretWrongKind", env.operator
        )
        await create_secret(
            env.api,
            env.namespace,
            admin_metadata("redis-admin", "127.0.0.1:6379", "redis"),
            {"password": "RedisAdminPassword_0123456789"},
        )
        await env.stacks.patch("redis-thief", {"spec": {"redis": {"adminSecret": "redis-admin"}}})
        await env.stacks.wait_condition(
            "redis-thief", "StreamReady", "False", "AdminHostNotAllowed", env.operator
        )
        assert env.write_pg.password.encode() not in fake.received
        assert b"RedisAdminPassword" not in fake.received


async def test_an_admin_secret_without_admin_hosts_is_sent_nowhere(
    env: Env,
) -> None:
    """A server may ask for the password in clear (asyncpg answers): the superuser's login of
    a Secret that names no hosts never goes out (AdminHostsRequired)."""
    await create_secret(
        env.api,
        env.namespace,
        {"name": "pg-admin", "labels": {"cqrs.dev/admin-credentials": "true"}},
        {"username": "postgres", "password": env.write_pg.password},
    )
    async with FakeServer(pg_asking_cleartext) as fake:
        manifest = env.manifest("clear")
        manifest["spec"]["databases"]["write"].update(port=fake.port, adminSecret="pg-admin")
        await env.stacks.create(manifest)
        await env.stacks.wait_condition("clear", "DatabasesReady", "False", None, env.operator)
        assert env.write_pg.password.encode() not in fake.received
        obj = await env.stacks.wait_condition(
            "clear", "DatabasesReady", "False", "AdminHostsRequired", env.operator
        )
        assert obj["status"]["phase"] == "Failed"
        assert env.write_pg.password.encode() not in fake.received
        assert fake.received == b""


async def test_deletion_sends_each_database_its_own_login(
    env: Env,
) -> None:
    """Two databases of one name on two servers: the tenant's server (its own labelled Secret)
    never receives the login of the platform's server, at provisioning nor at deletion."""
    async with FakeServer(pg_asking_cleartext) as fake:
        await create_secret(
            env.api,
            env.namespace,
            admin_metadata("mine3", f"127.0.0.1:{fake.port}"),
            {"username": "tenant", "password": "TenantsOwnPassword_0123456789"},
        )
        manifest = env.manifest("twins")
        databases = manifest["spec"]["databases"]
        databases["write"].update(port=fake.port, adminSecret="mine3")
        databases["write"]["database"] = databases["read"]["database"] = f"same_{env.fresh}"
        manifest["spec"]["deletionPolicy"] = "Delete"
        await env.stacks.create(manifest)
        await env.stacks.wait_condition("twins", "DatabasesReady", "False", None, env.operator)
        await env.stacks.delete("twins")
        await env.stacks.wait_gone("twins", env.operator)  # CQRS_OPERATOR_DELETE_TIMEOUT: 10 s
        assert b"TenantsOwnPassword" in fake.received  # the fake was asked, with mine3's
        assert env.read_pg.password.encode() not in fake.received
        assert env.write_pg.password.encode() not in fake.received


# ------------------------------------------------------------------- Redis logical databases


async def test_an_isolated_stack_cannot_reach_another_logical_database(
    env: Env,
) -> None:
    """ACL key patterns hold in every logical database: a stack at /1 naming the victim's
    stream (in /0) is refused, and no stack's ACL user may SELECT."""
    await redis_admin_secret(env.api, env.namespace)
    victim = env.manifest("victim")
    victim["spec"]["redis"]["adminSecret"] = "redis-admin"
    await env.stacks.create(victim)
    await env.stacks.wait_ready("victim", env.operator)
    stream = f"{env.namespace}.victim-events"
    url = env.redis.url.removesuffix("/0") + "/1"
    attacker = env.manifest("other-db", f"{env.fresh}_o", url)
    attacker["spec"]["redis"]["adminSecret"] = "redis-admin"
    attacker["spec"]["stream"] = {"name": stream}
    await env.stacks.create(attacker)
    await env.stacks.wait_condition(
        "other-db", "StreamReady", "False", "RedisDatabaseNotZero", env.operator
    )
    admin = Redis.from_url(env.redis.url)
    pods = Redis.from_url(
        (await secret_data(env.api, env.namespace, "victim-credentials"))["REDIS_URL"]
    )
    try:
        assert await admin.acl_getuser(f"cqrs.{env.namespace}.other-db") is None
        with pytest.raises(NoPermissionError):
            await pods.execute_command("SELECT", "1")
        assert await pods.xlen(stream) >= 0  # its own stream, in database 0
    finally:
        await admin.aclose()
        await pods.aclose()


# ------------------------------------------------------------------- squatting future names


async def test_a_refused_stack_gets_no_urls_nor_workloads(
    env: Env,
) -> None:
    """A default database already marked by another stack (squatted before names were
    reserved): the stack is refused and no Secret or Deployment points at that database."""
    future = names(env.namespace, "future")
    admin = await asyncpg.connect(env.write_pg.url())
    try:
        await admin.execute(f'CREATE DATABASE "{future.write_db}"')
        await admin.execute(
            f"COMMENT ON DATABASE \"{future.write_db}\" IS 'cqrs.dev/stack=squatter;origin=created'"
        )
        manifest = env.manifest("future")
        del manifest["spec"]["databases"]["write"]["database"]
        await env.stacks.create(manifest)
        obj = await env.stacks.wait_condition(
            "future", "WorkloadsReady", "False", "OwnedByAnotherStack", env.operator
        )
        assert obj["status"]["phase"] == "Failed"
        creds = await secret_data(env.api, env.namespace, "future-credentials")
        assert set(creds) == {"username", "password"}  # kept for the role, no URL
        apps = client.AppsV1Api(env.api)
        for component in ("write-api", "read-api", "projector"):
            with pytest.raises(ApiException) as missing:
                await apps.read_namespaced_deployment(f"future-{component}", env.namespace)
            assert missing.value.status == 404
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{future.write_db}"')
        await admin.close()


async def test_an_explicit_name_shaped_like_a_default_is_refused(
    env: Env,
) -> None:
    """Default names are predictable: tenant-b naming tenant-a/future's database or stream."""
    other = names("tenant-a", "future")
    manifest = env.manifest("atk4")
    manifest["spec"]["databases"]["write"]["database"] = other.write_db
    await env.stacks.create(manifest)
    obj = await env.stacks.wait_condition(
        "atk4", "DatabasesReady", "False", "ReservedName", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    assert not await database_exists(env.write_pg, other.write_db)
    manifest = env.manifest("atk4s", f"{env.fresh}_s")
    manifest["spec"]["stream"] = {"name": other.stream}
    await env.stacks.create(manifest)
    await env.stacks.wait_condition("atk4s", "StreamReady", "False", "ReservedName", env.operator)
    redis = Redis.from_url(env.redis.url)
    try:
        assert not await redis.exists(other.stream, f"{other.stream}:owner")
    finally:
        await redis.aclose()


async def test_a_dead_letter_stream_cannot_be_squatted(
    env: Env,
) -> None:
    """A stream named "<future's stream>:dead" is refused (reserved suffix) and loses the ACL
    user an older operator gave it; a "<stream>:dead" another stack marked refuses future."""
    await redis_admin_secret(env.api, env.namespace)
    dead = f"{env.namespace}.future-events:dead"
    admin = Redis.from_url(env.redis.url)
    try:
        user = f"cqrs.{env.namespace}.atk5"
        await admin.execute_command("ACL", "SETUSER", user, "on", "nopass", f"~{dead}", "+@all")
        await admin.set(f"{dead}:owner", "cqrs.dev/stack=squatter;origin=created")
        manifest = env.manifest("atk5")
        manifest["spec"]["redis"]["adminSecret"] = "redis-admin"
        manifest["spec"]["stream"] = {"name": dead}
        await env.stacks.create(manifest)
        await env.stacks.wait_condition(
            "atk5", "StreamReady", "False", "ReservedName", env.operator
        )
        assert await admin.acl_getuser(user) is None
        manifest = env.manifest("future", f"{env.fresh}_f")
        manifest["spec"]["redis"]["adminSecret"] = "redis-admin"
        await env.stacks.create(manifest)
        await env.stacks.wait_condition(
            "future", "StreamReady", "False", "OwnedByAnotherStack", env.operator
        )
        assert await admin.acl_getuser(f"cqrs.{env.namespace}.future") is None
    finally:
        await admin.aclose()


# ------------------------------------------------------------------- hosts and identity


@pytest.mark.parametrize("host", ["a" * 70 + ".example", "ü" * 80])
async def test_a_host_that_is_no_dns_name_is_refused_by_the_api_server(
    stacks: Stacks, write_pg: Any, read_pg: Any, fresh_names: str, host: str
) -> None:
    manifest = stack_manifest("idna", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    manifest["spec"]["databases"]["write"]["host"] = host
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422


async def test_a_redis_url_secret_with_a_bad_host_fails_and_deletion_ends(
    env: Env,
) -> None:
    """A host IDNA cannot encode (a label of 70 characters) in an opted-in URL Secret: a
    status naming it, not an endless UnicodeError; deletion still releases the finalizer."""
    await create_secret(
        env.api,
        env.namespace,
        {"name": "redis-url", "labels": {"cqrs.dev/stack-secret": "true"}},
        {"url": f"redis://{'a' * 70}.example:6379/0"},
    )
    manifest = env.manifest("badhost", redis_url="x")
    manifest["spec"]["redis"] = {"urlSecret": {"name": "redis-url", "key": "url"}}
    manifest["spec"]["deletionPolicy"] = "Delete"
    await env.stacks.create(manifest)
    await env.stacks.wait_condition(
        "badhost", "StreamReady", "False", "RedisUrlInvalid", env.operator
    )
    await env.stacks.delete("badhost")
    await env.stacks.wait_gone("badhost", env.operator, timeout=40)  # DELETE_TIMEOUT is 10 s here


async def test_the_redis_url_is_immutable_once_provisioned(
    env: Env,
) -> None:
    """/0 to /2 would orphan the stream: refused by the API server like the other identity."""
    await env.stacks.create(env.manifest("fixed"))
    await env.stacks.wait_ready("fixed", env.operator)
    moved = env.redis.url.removesuffix("/0") + "/2"
    with pytest.raises(ApiException) as refused:
        await env.stacks.patch("fixed", {"spec": {"redis": {"url": moved}}})
    assert refused.value.status == 422
    assert "spec.redis.url is immutable" in refused.value.body


async def test_a_ca_secret_naming_the_admin_secret_reaches_no_pod(env: Env) -> None:
    """A tenant names the platform's admin Secret as its databases' CA: DatabasesReady is
    refused, and although the stream provisions in the same reconcile no Deployment is
    applied with that Secret mounted (found by an attack: the CA was checked only on the
    databases' path, and the workloads were applied anyway)."""
    m = env.manifest("thief")
    m["spec"]["databases"]["tls"] = {
        "mode": "disable",
        "caSecret": {"name": ADMIN_SECRETS[0], "key": "password"},
    }
    await env.stacks.create(m)
    await env.stacks.wait_condition(
        "thief", "DatabasesReady", "False", "SecretNotOptedIn", env.operator
    )
    await env.stacks.wait_condition("thief", "StreamReady", "True", operator=env.operator)
    await env.stacks.wait_condition("thief", "WorkloadsReady", "False", operator=env.operator)
    apps = client.AppsV1Api(env.api)
    found = await apps.list_namespaced_deployment(env.namespace)
    mounted = [
        d.metadata.name
        for d in found.items
        for v in d.spec.template.spec.volumes or []
        if v.secret is not None and v.secret.secret_name in ADMIN_SECRETS
    ]
    assert mounted == []


@pytest.mark.parametrize("trick", ["#@127.0.0.1:{port}", "/0?x=@127.0.0.1:{port}"])
async def test_a_redis_url_cannot_send_the_admin_login_to_another_host(
    env: Env, trick: str
) -> None:
    """``redis://<allowed host>#@<tenant's host>``: the host checked against admin-hosts must
    be the host the admin login goes to. Such a URL is refused, and a listener of the
    tenant's receives nothing (found by an attack: the login went to the "@" past the host)."""
    await create_secret(
        env.api,
        env.namespace,
        admin_metadata("redis-admin-x", "127.0.0.1", "redis"),
        {"password": "platform-redis-admin-pw"},
    )
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got.append(await asyncio.wait_for(reader.read(4096), 3))
        except TimeoutError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = env.redis.url.rstrip("/") + trick.format(port=port)
        m = env.manifest("exfil", redis_url=url)
        m["spec"]["redis"]["adminSecret"] = "redis-admin-x"
        await env.stacks.create(m)
        await env.stacks.wait_condition(
            "exfil", "WorkloadsReady", "False", "InvalidSpec", env.operator
        )
        # The same URL from the stack's own opted-in Secret (spec.redis.urlSecret).
        await create_secret(
            env.api,
            env.namespace,
            {"name": "exfil-url", "labels": {"cqrs.dev/stack-secret": "true"}},
            {"url": url},
        )
        m = env.manifest("exfil2", fresh=env.fresh + "x")
        m["spec"]["redis"] = {
            "urlSecret": {"name": "exfil-url", "key": "url"},
            "adminSecret": "redis-admin-x",
        }
        await env.stacks.create(m)
        await env.stacks.wait_condition(
            "exfil2", "StreamReady", "False", "RedisUrlInvalid", env.operator
        )
    finally:
        server.close()
        await server.wait_closed()
    assert got == []

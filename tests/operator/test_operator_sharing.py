"""Many stacks on shared servers: ownership markers, refusals, safe deletion, admin opt-in,
SCRAM verifiers, a reconciled credentials Secret and a status that tells the truth.

Real kube-apiserver, real PostgreSQL and Redis, the operator as a subprocess; no kubelet, so
a Deployment is available only when a test marks it so (``Stacks.mark_available``).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from cqrs_operator.spec import GROUP, PLURAL, VERSION
from tests.operator.fixtures_operator import (
    ADMIN_SECRETS,
    ROOT,
    Env,
    Stacks,
    allow_adoption,
    config_hashes,
    database_exists,
    names,
    redis_admin_secret,
    secret_data,
    stack_manifest,
    wait_credentials,
    wait_event,
    wait_until,
)
from tests.operator.kubelet_standin import run_migration_job_when_created

KUBECTL = ROOT / ".cache" / "bin" / "kubectl"


async def test_an_intruder_pointed_at_another_stacks_objects_is_refused_and_its_deletion_keeps_them(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("owner"))
    await env.stacks.wait_ready("owner", env.operator)
    for reason in ("RoleCreated", "DatabaseCreated", "MigrationsApplied", "StreamCreated"):
        await wait_event(env.api, env.namespace, "owner", reason, env.operator)
    creds = await secret_data(env.api, env.namespace, "owner-credentials")
    conn = await asyncpg.connect(creds["WRITE_DB_URL"])
    try:
        await conn.execute("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('x')")
    finally:
        await conn.close()
    stream = f"{env.namespace}.owner-events"
    redis = Redis.from_url(env.redis.url)
    try:
        await redis.xadd(stream, {"type": "RecordCreated", "position": "1"})

        # Same databases and stream, deletionPolicy Delete: the intruder gets nothing.
        intruder = env.manifest(
            "intruder",
            deletionPolicy="Delete",
            stream={"name": stream},
            adopt=True,  # adopt never takes another stack's objects
        )
        await env.stacks.create(intruder)
        refused = await env.stacks.wait_condition(
            "intruder", "DatabasesReady", "False", "OwnedByAnotherStack", env.operator
        )
        message = {c["type"]: c for c in refused["status"]["conditions"]}["DatabasesReady"][
            "message"
        ]
        assert f"w_{env.fresh}" in message
        await env.stacks.wait_condition(
            "intruder", "StreamReady", "False", "OwnedByAnotherStack", env.operator
        )
        obj = await env.stacks.wait_condition("intruder", "Ready", "False", None, env.operator)
        assert obj["status"]["phase"] == "Failed"
        warning = await wait_event(
            env.api, env.namespace, "intruder", "OwnedByAnotherStack", env.operator
        )
        assert warning.type == "Warning"

        await env.stacks.delete("intruder")
        await env.stacks.wait_gone("intruder", env.operator)

        # The owner's data, role password, database ownership and stream are intact.
        conn = await asyncpg.connect(creds["WRITE_DB_URL"])
        try:
            assert await conn.fetchval("SELECT v FROM precious") == "x"
            assert (
                await conn.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database "
                    "WHERE datname = current_database()"
                )
                == creds["username"]
            )
        finally:
            await conn.close()
        assert await database_exists(env.read_pg, f"r_{env.fresh}")
        assert await redis.xlen(stream) == 1
        assert [g["name"] for g in await redis.xinfo_groups(stream)] == [b"projectors"]
    finally:
        await redis.aclose()
    await env.stacks.wait_ready("owner", env.operator)


async def test_an_unmarked_database_is_used_only_with_adopt_and_never_dropped(
    env: Env,
) -> None:
    admin = await asyncpg.connect(env.write_pg.url())
    try:
        await admin.execute(f"CREATE DATABASE w_{env.fresh}")
    finally:
        await admin.close()
    await env.stacks.create(env.manifest("adopter", deletionPolicy="Delete"))
    obj = await env.stacks.wait_condition(
        "adopter", "DatabasesReady", "False", "NotOwned", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    await wait_event(env.api, env.namespace, "adopter", "NotOwned", env.operator)

    # The tenant's word alone is not enough: the platform allows adoption on the server.
    await env.stacks.patch("adopter", {"spec": {"adopt": True}})
    await env.stacks.wait_condition(
        "adopter", "DatabasesReady", "False", "AdoptionNotAllowed", env.operator
    )
    await allow_adoption(env.api, env.namespace)
    await env.stacks.wait_ready("adopter", env.operator)
    await wait_event(env.api, env.namespace, "adopter", "DatabaseAdopted", env.operator)
    await env.stacks.delete("adopter")
    await env.stacks.wait_gone("adopter", env.operator)
    assert await database_exists(env.write_pg, f"w_{env.fresh}")  # adopted: kept
    assert not await database_exists(env.read_pg, f"r_{env.fresh}")  # created: dropped
    left = await wait_event(env.api, env.namespace, "adopter", "LeftBehind", env.operator)
    assert f"w_{env.fresh}" in left.message


async def test_an_admin_secret_must_opt_in_by_label_and_may_pin_hosts(
    env: Env,
) -> None:
    core = client.CoreV1Api(env.api)
    await core.create_namespaced_secret(
        env.namespace,
        {
            "metadata": {"name": "app-db-login"},  # some Secret, never meant for the operator
            "stringData": {"username": "postgres", "password": env.write_pg.password},
        },
    )
    manifest = env.manifest("deputy")
    manifest["spec"]["databases"]["write"]["adminSecret"] = "app-db-login"
    await env.stacks.create(manifest)
    obj = await env.stacks.wait_condition(
        "deputy", "DatabasesReady", "False", "AdminSecretNotOptedIn", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    assert not await database_exists(env.write_pg, f"w_{env.fresh}")

    # Labelled, but pinned to another host: still refused.
    await core.patch_namespaced_secret(
        "app-db-login",
        env.namespace,
        {
            "metadata": {
                "labels": {"cqrs.dev/admin-credentials": "true"},
                "annotations": {"cqrs.dev/admin-hosts": "pg.elsewhere:5432"},
            }
        },
    )
    await env.stacks.wait_condition(
        "deputy", "DatabasesReady", "False", "AdminHostNotAllowed", env.operator
    )
    await core.patch_namespaced_secret(
        "app-db-login",
        env.namespace,
        {"metadata": {"annotations": {"cqrs.dev/admin-hosts": f"127.0.0.1:{env.write_pg.port}"}}},
    )
    await env.stacks.wait_ready("deputy", env.operator)


async def test_role_passwords_travel_as_scram_verifiers_not_in_sql_text(
    env: Env,
) -> None:
    log = Path(env.write_pg.data_dir) / "server.log"
    env.write_pg.psql("ALTER SYSTEM SET log_statement = 'ddl'")
    env.write_pg.psql("SELECT pg_reload_conf()")
    try:
        start = log.stat().st_size
        await env.stacks.create(env.manifest("scram"))
        await env.stacks.wait_condition("scram", "DatabasesReady", "True", None, env.operator)
        password = (await secret_data(env.api, env.namespace, "scram-credentials"))["password"]
        with log.open("rb") as f:
            f.seek(start)
            logged = f.read().decode(errors="replace")
        assert "CREATE ROLE" in logged and "SCRAM-SHA-256$4096:" in logged  # DDL was logged
        assert password not in logged
    finally:
        env.write_pg.psql("ALTER SYSTEM RESET log_statement")
        env.write_pg.psql("SELECT pg_reload_conf()")


async def test_a_deleted_credentials_secret_converges_in_at_most_one_rollout(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("creds"))
    await env.stacks.wait_ready("creds", env.operator)
    before = await config_hashes(env.api, env.namespace, "creds")
    before_login = (await secret_data(env.api, env.namespace, "creds-credentials"))["username"]
    core = client.CoreV1Api(env.api)
    await core.delete_namespaced_secret("creds-credentials", env.namespace)

    data = await wait_credentials(env.api, env.namespace, "creds", env.operator)
    # The running pods hold the deleted Secret's login: the new password goes to the other
    # login slot (a rotation), and the old login is revoked once the rollout is done.
    await wait_event(env.api, env.namespace, "creds", "RotationStarted", env.operator)
    assert data["username"] != before_login
    await env.stacks.wait_ready("creds", env.operator)
    await env.stacks.wait_condition("creds", "CredentialsCurrent", "True", "Current", env.operator)
    for url in (data["WRITE_DB_URL"], data["READ_DB_URL"]):
        conn = await asyncpg.connect(url)
        await conn.close()
    after = await config_hashes(env.api, env.namespace, "creds")
    # The password is read by all: every Deployment has a new hash (one rollout each).
    assert all(after[c] != before[c] for c in after), (before, after)
    await wait_event(env.api, env.namespace, "creds", "RolloutStarted", env.operator)
    # Several reconcile intervals (2 s here) later nothing has rolled again. A wait for a
    # condition cannot show that nothing happens: this is a bounded observation window.
    await asyncio.sleep(7)
    assert await config_hashes(env.api, env.namespace, "creds") == after
    assert (await secret_data(env.api, env.namespace, "creds-credentials")) == data


async def test_ready_means_serving_and_reasons_come_from_the_pods(
    env: Env,
    kube_apiserver: Any,
) -> None:
    await env.stacks.create(env.manifest("serving"))
    await run_migration_job_when_created(env.api, env.namespace, "serving")
    for part in ("DatabasesReady", "MigrationsApplied", "StreamReady", "WorkloadsReady"):
        await env.stacks.wait_condition("serving", part, "True", None, env.operator)
    # No kubelet: no Deployment becomes available, so the stack is not Ready.
    obj = await env.stacks.wait_condition(
        "serving", "WorkloadsAvailable", "False", "RolloutInProgress", env.operator
    )
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds["Ready"]["status"] == "False"
    assert obj["status"]["phase"] == "Provisioning"

    # A pod of the read API that cannot pull its image: the reason reaches the stack.
    core = client.CoreV1Api(env.api)
    labels = {
        "app.kubernetes.io/name": "cqrs-stack",
        "app.kubernetes.io/instance": "serving",
        "app.kubernetes.io/component": "read-api",
    }
    await core.create_namespaced_pod(
        env.namespace,
        {
            "metadata": {"name": "serving-read-api-x", "labels": labels},
            "spec": {"containers": [{"name": "read-api", "image": "cqrs-stack:no-such-tag"}]},
        },
    )
    waiting = {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
    await core.patch_namespaced_pod_status(
        "serving-read-api-x",
        env.namespace,
        {
            "status": {
                "containerStatuses": [
                    {
                        "name": "read-api",
                        "image": "cqrs-stack:no-such-tag",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": waiting},
                    }
                ]
            }
        },
    )
    obj = await env.stacks.wait_condition(
        "serving", "WorkloadsAvailable", "False", "ImagePullBackOff", env.operator
    )
    assert obj["status"]["phase"] == "Failed"
    assert (
        "serving-read-api-x"
        in {c["type"]: c for c in obj["status"]["conditions"]}["WorkloadsAvailable"]["message"]
    )
    table = subprocess.run(
        [
            str(KUBECTL),
            "--kubeconfig",
            str(kube_apiserver.kubeconfig),
            "get",
            "cqrs",
            "serving",
            "-n",
            env.namespace,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "REASON" in table.splitlines()[0] and "ImagePullBackOff" in table

    await core.delete_namespaced_pod("serving-read-api-x", env.namespace, grace_period_seconds=0)
    await env.stacks.wait_ready("serving", env.operator)  # available: Ready


async def test_reverification_repairs_a_dropped_database_and_drift_without_redis(
    env: Env,
    redis_factory: Any,
) -> None:
    redis = redis_factory()
    await env.stacks.create(env.manifest("verify", redis_url=redis.url))
    await env.stacks.wait_ready("verify", env.operator)

    admin = await asyncpg.connect(env.read_pg.url())
    try:
        await admin.execute(f"DROP DATABASE r_{env.fresh} WITH (FORCE)")
    finally:
        await admin.close()

    async def recreated() -> bool:
        return await database_exists(env.read_pg, f"r_{env.fresh}")

    await wait_until(
        recreated, timeout=30, what="read DB recreated", alive=env.operator.exit_reason
    )
    await env.stacks.wait_ready("verify", env.operator)

    redis.stop()
    obj = await env.stacks.wait_condition(
        "verify", "StreamReady", "False", "RedisUnreachable", env.operator
    )
    assert obj["status"]["phase"] == "Degraded"
    apps = client.AppsV1Api(env.api)
    await apps.patch_namespaced_deployment(
        "verify-read-api", env.namespace, {"spec": {"replicas": 7}}
    )

    async def restored() -> bool:
        dep = await apps.read_namespaced_deployment("verify-read-api", env.namespace)
        return dep.spec.replicas == 2

    await wait_until(restored, timeout=30, what="drift corrected", alive=env.operator.exit_reason)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"databases": {"write": {"database": "elsewhere"}}}, "spec.databases.write host"),
        ({"databases": {"read": {"host": "pg.elsewhere"}}}, "spec.databases.read host"),
        ({"stream": {"name": "other-stream"}}, "spec.stream name and consumerGroup"),
        ({"stream": {"consumerGroup": "g2"}}, "spec.stream name and consumerGroup"),
    ],
)
async def test_identity_fields_are_immutable(
    stacks: Stacks,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
    patch: dict[str, Any],
    message: str,
) -> None:
    await stacks.create(
        stack_manifest("fixed", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    )
    await stacks.patch("fixed", {"spec": patch})  # not provisioned yet: a typo may be fixed
    original = stack_manifest("fixed", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    current = await stacks.get("fixed")
    assert current is not None
    current["spec"] = {**current["spec"], **original["spec"]}  # back to the original identity
    if "stream" in patch:
        current["spec"]["stream"] = {"name": "", "consumerGroup": "projectors"}
    await stacks.custom.replace_namespaced_custom_object(
        GROUP, VERSION, stacks.namespace, PLURAL, "fixed", current
    )
    # What the operator records once the databases and the stream exist:
    recorded = {"databases": {"write": "w", "read": "r", "role": "x"}, "stream": {"name": "s"}}
    await stacks.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        stacks.namespace,
        PLURAL,
        "fixed",
        {"status": recorded},
        _content_type="application/merge-patch+json",
    )
    with pytest.raises(ApiException) as refused:
        await stacks.patch("fixed", {"spec": patch})
    assert refused.value.status == 422
    assert message in refused.value.body and "to move a stack" in refused.value.body
    await stacks.patch("fixed", {"spec": {"readApi": {"replicas": 3}}})  # the rest may change
    await stacks.delete("fixed")  # no operator watches here: no finalizer to wait for


@pytest.mark.parametrize(
    "spec",
    [
        {"projector": {"autoscaling": {"targetLag": 10**9 + 1}}},
        {"stream": {"maxLength": 10**12 + 1}},
    ],
)
async def test_values_past_the_operators_bounds_are_refused_by_the_api_server(
    stacks: Stacks, write_pg: Any, read_pg: Any, fresh_names: str, spec: dict[str, Any]
) -> None:
    manifest = stack_manifest("bounds", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    manifest["spec"].update(spec)
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422


async def test_a_teardown_that_keeps_failing_releases_the_finalizer_with_a_warning(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("stuck", deletionPolicy="Delete"))
    await env.stacks.wait_ready("stuck", env.operator)
    await client.CoreV1Api(env.api).delete_namespaced_secret(ADMIN_SECRETS[0], env.namespace)
    await env.stacks.delete("stuck")
    # CQRS_OPERATOR_DELETE_TIMEOUT is 10 s in the tests: released well within 40 s.
    await env.stacks.wait_gone("stuck", env.operator, timeout=40)
    warning = await wait_event(env.api, env.namespace, "stuck", "CleanupAbandoned", env.operator)
    assert warning.type == "Warning" and f"w_{env.fresh}" in warning.message
    # Logged too: a namespace being deleted accepts no Event, the log still names what is left.
    logged = [line for line in env.operator.log_text().splitlines() if "CleanupAbandoned" in line]
    assert any(f"w_{env.fresh}" in line for line in logged), env.operator.log_tail()
    assert await database_exists(env.write_pg, f"w_{env.fresh}")  # the documented outcome: kept


async def test_with_redis_admin_credentials_a_stack_cannot_touch_another_stacks_stream(
    env: Env,
) -> None:
    """Each stack's pods log in as their own ACL user: stack A cannot read, trim or delete
    stack B's stream, with the very credentials A's pods get."""
    await redis_admin_secret(env.api, env.namespace)
    for name in ("tenant-a", "tenant-b"):
        manifest = env.manifest(name, f"{env.fresh}_{name[-1]}", "x")
        manifest["spec"]["redis"] = {"url": env.redis.url, "adminSecret": "redis-admin"}
        await env.stacks.create(manifest)
    await env.stacks.create(env.manifest("tenant-c", f"{env.fresh}_c"))
    for name in ("tenant-a", "tenant-b"):
        obj = await env.stacks.wait_ready(name, env.operator)
        isolation = {c["type"]: c for c in obj["status"]["conditions"]}["RedisIsolation"]
        assert isolation["status"] == "True"
        await wait_event(env.api, env.namespace, name, "AclUserCreated", env.operator)
    await env.stacks.wait_condition(
        "tenant-c", "RedisIsolation", "False", "NoAdminCredentials", env.operator
    )

    a_url = (await secret_data(env.api, env.namespace, "tenant-a-credentials"))["REDIS_URL"]
    assert a_url.startswith(f"redis://cqrs.{env.namespace}.tenant-a:")
    own, other = f"{env.namespace}.tenant-a-events", f"{env.namespace}.tenant-b-events"
    pods = Redis.from_url(a_url)
    admin = Redis.from_url(env.redis.url)
    try:
        await admin.xadd(other, {"type": "RecordCreated", "position": "1"})
        await pods.xadd(own, {"type": "RecordCreated", "position": "1"})  # its own: allowed
        assert await pods.xlen(own) >= 1
        for attempt in (
            lambda: pods.xrange(other),
            lambda: pods.xlen(other),
            lambda: pods.xtrim(other, maxlen=0),
            lambda: pods.delete(other),
            lambda: pods.set(f"{own}:owner", "forged"),  # nor rewrite its own owner marker
            lambda: pods.keys("*"),
        ):
            with pytest.raises(NoPermissionError):
                await attempt()
        assert await admin.xlen(other) == 1
    finally:
        await pods.aclose()
        await admin.aclose()


async def test_a_stack_provisioned_before_markers_keeps_its_names_on_upgrade(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    stacks: Stacks,
    namespace: str,
    operator_factory: Any,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """An older operator named the role cqrs_<ns>_<name> and the stream <name>-events, marked
    nothing, and recorded the names in status: the stack keeps them, claimed as adopted."""
    old_role = f"cqrs_{namespace.replace('-', '_')}_legacy"
    for server, db in ((write_pg, f"w_{fresh_names}"), (read_pg, f"r_{fresh_names}")):
        admin = await asyncpg.connect(server.url())
        try:
            await admin.execute(f"CREATE ROLE {old_role} LOGIN PASSWORD 'old-password-0123456'")
            await admin.execute(f"CREATE DATABASE {db} OWNER {old_role}")
        finally:
            await admin.close()
    redis = Redis.from_url(redis_server.url)
    try:
        await redis.xgroup_create("legacy-events", "projectors", id="0", mkstream=True)
    finally:
        await redis.aclose()
    stack = await stacks.create(
        stack_manifest("legacy", fresh_names, write_pg, read_pg, redis_server.url)
    )
    # The older operator's credentials Secret, controlled by the stack: kept as it is.
    await client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        {
            "metadata": {
                "name": "legacy-credentials",
                "ownerReferences": [
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "CqrsStack",
                        "name": "legacy",
                        "uid": stack["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "stringData": {"username": old_role, "password": "old-password-0123456"},
        },
    )
    recorded = {
        "databases": {"write": f"w_{fresh_names}", "read": f"r_{fresh_names}", "role": old_role},
        "stream": {"name": "legacy-events", "consumerGroup": "projectors"},
    }
    await stacks.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "legacy",
        {"status": recorded},
        _content_type="application/merge-patch+json",
    )
    operator = operator_factory(kube_apiserver.kubeconfig, namespace)
    await stacks.wait_ready("legacy", operator)
    creds = await secret_data(kube_api, namespace, "legacy-credentials")
    assert creds["username"] == old_role and creds["password"] == "old-password-0123456"
    conn = await asyncpg.connect(creds["WRITE_DB_URL"])  # its login is unchanged
    await conn.close()
    config = await client.CoreV1Api(kube_api).read_namespaced_config_map("legacy-config", namespace)
    assert config.data["EVENT_STREAM_NAME"] == "legacy-events"
    admin = await asyncpg.connect(write_pg.url())
    try:
        comment = await admin.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            f"w_{fresh_names}",
        )
        assert comment is not None and comment.endswith("origin=adopted")
        assert not await admin.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", names(namespace, "legacy").role
        )
    finally:
        await admin.close()


async def test_redis_isolation_is_unknown_while_redis_cannot_be_checked(
    env: Env, redis_factory: Any
) -> None:
    """RedisIsolation=True is a claim checked each reconcile: with Redis unreachable it is
    Unknown, not the last True (found by an attack: it stayed True, AclUser, while down)."""
    server = redis_factory()
    await redis_admin_secret(env.api, env.namespace)
    m = env.manifest("isodown", fresh=env.fresh + "iso", redis_url=server.url)
    m["spec"]["redis"]["adminSecret"] = "redis-admin"
    await env.stacks.create(m)
    await env.stacks.wait_condition("isodown", "RedisIsolation", "True", "AclUser", env.operator)
    server.stop()
    await env.stacks.wait_condition(
        "isodown", "RedisIsolation", "Unknown", "RedisUnreachable", env.operator
    )
    server.start()
    await env.stacks.wait_condition("isodown", "RedisIsolation", "True", "AclUser", env.operator)

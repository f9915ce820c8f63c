"""Many stacks on shared servers: ownership markers, refusals, safe deletion, admin opt-in,
SCRAM verifiers, a reconciled credentials Secret and a status that tells the truth.

Real kube-apiserver, real PostgreSQL and Redis, the operator as a subprocess; no kubelet, so
a Deployment is available only when a test marks it so (``Stacks.mark_available``).
"""

from __future__ import annotations

import asyncio
import base64
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
    Operator,
    Stacks,
    admin_metadata,
    database_exists,
    names,
    stack_manifest,
    wait_until,
)
from tests.operator.kubelet_standin import run_migration_job_when_created

KUBECTL = ROOT / ".cache" / "bin" / "kubectl"


async def allow_adoption(api: client.ApiClient, namespace: str) -> None:
    """The platform's consent: the admin Secrets allow stacks to adopt unmarked objects."""
    for secret in ADMIN_SECRETS:
        await client.CoreV1Api(api).patch_namespaced_secret(
            secret, namespace, {"metadata": {"annotations": {"cqrs.dev/allow-adopt": "true"}}}
        )


async def events(api: client.ApiClient, namespace: str, name: str) -> list[Any]:
    listed = await client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(listed.items)


async def wait_event(
    api: client.ApiClient, namespace: str, name: str, reason: str, operator: Operator
) -> Any:
    async def found() -> Any:
        return next((e for e in await events(api, namespace, name) if e.reason == reason), None)

    return await wait_until(
        found, timeout=30, what=f"Event {reason} on {name}", alive=operator.exit_reason
    )


async def secret_data(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    secret = await client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


async def config_hashes(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    """The config hash of each Deployment (one per component: each hashes what it reads)."""
    apps = client.AppsV1Api(api)
    out = {}
    for component in ("write-api", "read-api", "projector"):
        dep = await apps.read_namespaced_deployment(f"{name}-{component}", namespace)
        out[component] = dep.spec.template.metadata.annotations["cqrs.dev/config-hash"]
    return out


async def test_an_intruder_pointed_at_another_stacks_objects_is_refused_and_its_deletion_keeps_them(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    await stacks.create(stack_manifest("owner", fresh_names, write_pg, read_pg, redis_server.url))
    await stacks.wait_ready("owner", operator)
    for reason in ("RoleCreated", "DatabaseCreated", "MigrationsApplied", "StreamCreated"):
        await wait_event(kube_api, namespace, "owner", reason, operator)
    creds = await secret_data(kube_api, namespace, "owner-credentials")
    conn = await asyncpg.connect(creds["WRITE_DB_URL"])
    try:
        await conn.execute("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('x')")
    finally:
        await conn.close()
    stream = f"{namespace}.owner-events"
    redis = Redis.from_url(redis_server.url)
    try:
        await redis.xadd(stream, {"type": "RecordCreated", "position": "1"})

        # Same databases and stream, deletionPolicy Delete: the intruder gets nothing.
        intruder = stack_manifest(
            "intruder",
            fresh_names,
            write_pg,
            read_pg,
            redis_server.url,
            deletionPolicy="Delete",
            stream={"name": stream},
            adopt=True,  # adopt never takes another stack's objects
        )
        await stacks.create(intruder)
        refused = await stacks.wait_condition(
            "intruder", "DatabasesReady", "False", "OwnedByAnotherStack", operator
        )
        message = {c["type"]: c for c in refused["status"]["conditions"]}["DatabasesReady"][
            "message"
        ]
        assert f"w_{fresh_names}" in message
        await stacks.wait_condition(
            "intruder", "StreamReady", "False", "OwnedByAnotherStack", operator
        )
        obj = await stacks.wait_condition("intruder", "Ready", "False", None, operator)
        assert obj["status"]["phase"] == "Failed"
        warning = await wait_event(kube_api, namespace, "intruder", "OwnedByAnotherStack", operator)
        assert warning.type == "Warning"

        await stacks.delete("intruder")
        await stacks.wait_gone("intruder", operator)

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
        assert await database_exists(read_pg, f"r_{fresh_names}")
        assert await redis.xlen(stream) == 1
        assert [g["name"] for g in await redis.xinfo_groups(stream)] == [b"projectors"]
    finally:
        await redis.aclose()
    await stacks.wait_ready("owner", operator)


async def test_an_unmarked_database_is_used_only_with_adopt_and_never_dropped(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    admin = await asyncpg.connect(write_pg.url())
    try:
        await admin.execute(f"CREATE DATABASE w_{fresh_names}")
    finally:
        await admin.close()
    await stacks.create(
        stack_manifest(
            "adopter", fresh_names, write_pg, read_pg, redis_server.url, deletionPolicy="Delete"
        )
    )
    obj = await stacks.wait_condition("adopter", "DatabasesReady", "False", "NotOwned", operator)
    assert obj["status"]["phase"] == "Failed"
    await wait_event(kube_api, namespace, "adopter", "NotOwned", operator)

    # The tenant's word alone is not enough: the platform allows adoption on the server.
    await stacks.patch("adopter", {"spec": {"adopt": True}})
    await stacks.wait_condition(
        "adopter", "DatabasesReady", "False", "AdoptionNotAllowed", operator
    )
    await allow_adoption(kube_api, namespace)
    await stacks.wait_ready("adopter", operator)
    await wait_event(kube_api, namespace, "adopter", "DatabaseAdopted", operator)
    await stacks.delete("adopter")
    await stacks.wait_gone("adopter", operator)
    assert await database_exists(write_pg, f"w_{fresh_names}")  # adopted: kept
    assert not await database_exists(read_pg, f"r_{fresh_names}")  # created: dropped
    left = await wait_event(kube_api, namespace, "adopter", "LeftBehind", operator)
    assert f"w_{fresh_names}" in left.message


async def test_an_admin_secret_must_opt_in_by_label_and_may_pin_hosts(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "app-db-login"},  # some Secret, never meant for the operator
            "stringData": {"username": "postgres", "password": write_pg.password},
        },
    )
    manifest = stack_manifest("deputy", fresh_names, write_pg, read_pg, redis_server.url)
    manifest["spec"]["databases"]["write"]["adminSecret"] = "app-db-login"
    await stacks.create(manifest)
    obj = await stacks.wait_condition(
        "deputy", "DatabasesReady", "False", "AdminSecretNotOptedIn", operator
    )
    assert obj["status"]["phase"] == "Failed"
    assert not await database_exists(write_pg, f"w_{fresh_names}")

    # Labelled, but pinned to another host: still refused.
    await core.patch_namespaced_secret(
        "app-db-login",
        namespace,
        {
            "metadata": {
                "labels": {"cqrs.dev/admin-credentials": "true"},
                "annotations": {"cqrs.dev/admin-hosts": "pg.elsewhere:5432"},
            }
        },
    )
    await stacks.wait_condition(
        "deputy", "DatabasesReady", "False", "AdminHostNotAllowed", operator
    )
    await core.patch_namespaced_secret(
        "app-db-login",
        namespace,
        {"metadata": {"annotations": {"cqrs.dev/admin-hosts": f"127.0.0.1:{write_pg.port}"}}},
    )
    await stacks.wait_ready("deputy", operator)


async def test_role_passwords_travel_as_scram_verifiers_not_in_sql_text(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    log = Path(write_pg.data_dir) / "server.log"
    write_pg.psql("ALTER SYSTEM SET log_statement = 'ddl'")
    write_pg.psql("SELECT pg_reload_conf()")
    try:
        start = log.stat().st_size
        await stacks.create(
            stack_manifest("scram", fresh_names, write_pg, read_pg, redis_server.url)
        )
        await stacks.wait_condition("scram", "DatabasesReady", "True", None, operator)
        password = (await secret_data(kube_api, namespace, "scram-credentials"))["password"]
        with log.open("rb") as f:
            f.seek(start)
            logged = f.read().decode(errors="replace")
        assert "CREATE ROLE" in logged and "SCRAM-SHA-256$4096:" in logged  # DDL was logged
        assert password not in logged
    finally:
        write_pg.psql("ALTER SYSTEM RESET log_statement")
        write_pg.psql("SELECT pg_reload_conf()")


async def test_a_deleted_credentials_secret_converges_in_at_most_one_rollout(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    await stacks.create(stack_manifest("creds", fresh_names, write_pg, read_pg, redis_server.url))
    await stacks.wait_ready("creds", operator)
    before = await config_hashes(kube_api, namespace, "creds")
    core = client.CoreV1Api(kube_api)
    await core.delete_namespaced_secret("creds-credentials", namespace)

    async def recreated() -> dict[str, str] | None:
        try:
            data = await secret_data(kube_api, namespace, "creds-credentials")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        # The new password is stored alone first; the URLs follow once the databases answer.
        return data if "WRITE_DB_URL" in data else None

    data = await wait_until(
        recreated, timeout=30, what="credentials Secret recreated", alive=operator.exit_reason
    )
    # The reconcile that recreated it sets the new password on the role (then reports it).
    await wait_event(kube_api, namespace, "creds", "RolePasswordSet", operator)
    await stacks.wait_ready("creds", operator)
    for url in (data["WRITE_DB_URL"], data["READ_DB_URL"]):
        conn = await asyncpg.connect(url)
        await conn.close()
    after = await config_hashes(kube_api, namespace, "creds")
    # The password is read by all: every Deployment has a new hash (one rollout each).
    assert all(after[c] != before[c] for c in after), (before, after)
    await wait_event(kube_api, namespace, "creds", "RolloutStarted", operator)
    # Several reconcile intervals (2 s here) later nothing has rolled again. A wait for a
    # condition cannot show that nothing happens: this is a bounded observation window.
    await asyncio.sleep(7)
    assert await config_hashes(kube_api, namespace, "creds") == after
    assert (await secret_data(kube_api, namespace, "creds-credentials")) == data


async def test_ready_means_serving_and_reasons_come_from_the_pods(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    await stacks.create(stack_manifest("serving", fresh_names, write_pg, read_pg, redis_server.url))
    await run_migration_job_when_created(kube_api, namespace, "serving")
    for part in ("DatabasesReady", "MigrationsApplied", "StreamReady", "WorkloadsReady"):
        await stacks.wait_condition("serving", part, "True", None, operator)
    # No kubelet: no Deployment becomes available, so the stack is not Ready.
    obj = await stacks.wait_condition(
        "serving", "WorkloadsAvailable", "False", "RolloutInProgress", operator
    )
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds["Ready"]["status"] == "False"
    assert obj["status"]["phase"] == "Provisioning"

    # A pod of the read API that cannot pull its image: the reason reaches the stack.
    core = client.CoreV1Api(kube_api)
    labels = {
        "app.kubernetes.io/name": "cqrs-stack",
        "app.kubernetes.io/instance": "serving",
        "app.kubernetes.io/component": "read-api",
    }
    await core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "serving-read-api-x", "labels": labels},
            "spec": {"containers": [{"name": "read-api", "image": "cqrs-stack:no-such-tag"}]},
        },
    )
    waiting = {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
    await core.patch_namespaced_pod_status(
        "serving-read-api-x",
        namespace,
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
    obj = await stacks.wait_condition(
        "serving", "WorkloadsAvailable", "False", "ImagePullBackOff", operator
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
            namespace,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "REASON" in table.splitlines()[0] and "ImagePullBackOff" in table

    await core.delete_namespaced_pod("serving-read-api-x", namespace, grace_period_seconds=0)
    await stacks.wait_ready("serving", operator)  # available: Ready


async def test_reverification_repairs_a_dropped_database_and_drift_without_redis(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_factory: Any,
    fresh_names: str,
) -> None:
    redis = redis_factory()
    await stacks.create(stack_manifest("verify", fresh_names, write_pg, read_pg, redis.url))
    await stacks.wait_ready("verify", operator)

    admin = await asyncpg.connect(read_pg.url())
    try:
        await admin.execute(f"DROP DATABASE r_{fresh_names} WITH (FORCE)")
    finally:
        await admin.close()

    async def recreated() -> bool:
        return await database_exists(read_pg, f"r_{fresh_names}")

    await wait_until(recreated, timeout=30, what="read DB recreated", alive=operator.exit_reason)
    await stacks.wait_ready("verify", operator)

    redis.stop()
    obj = await stacks.wait_condition(
        "verify", "StreamReady", "False", "RedisUnreachable", operator
    )
    assert obj["status"]["phase"] == "Degraded"
    apps = client.AppsV1Api(kube_api)
    await apps.patch_namespaced_deployment("verify-read-api", namespace, {"spec": {"replicas": 7}})

    async def restored() -> bool:
        dep = await apps.read_namespaced_deployment("verify-read-api", namespace)
        return dep.spec.replicas == 2

    await wait_until(restored, timeout=30, what="drift corrected", alive=operator.exit_reason)


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
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    await stacks.create(
        stack_manifest(
            "stuck", fresh_names, write_pg, read_pg, redis_server.url, deletionPolicy="Delete"
        )
    )
    await stacks.wait_ready("stuck", operator)
    await client.CoreV1Api(kube_api).delete_namespaced_secret(ADMIN_SECRETS[0], namespace)
    await stacks.delete("stuck")
    # CQRS_OPERATOR_DELETE_TIMEOUT is 10 s in the tests: released well within 40 s.
    await stacks.wait_gone("stuck", operator, timeout=40)
    warning = await wait_event(kube_api, namespace, "stuck", "CleanupAbandoned", operator)
    assert warning.type == "Warning" and f"w_{fresh_names}" in warning.message
    # Logged too: a namespace being deleted accepts no Event, the log still names what is left.
    logged = [line for line in operator.log_text().splitlines() if "CleanupAbandoned" in line]
    assert any(f"w_{fresh_names}" in line for line in logged), operator.log_tail()
    assert await database_exists(write_pg, f"w_{fresh_names}")  # the documented outcome: kept


async def test_with_redis_admin_credentials_a_stack_cannot_touch_another_stacks_stream(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """Each stack's pods log in as their own ACL user: stack A cannot read, trim or delete
    stack B's stream, with the very credentials A's pods get."""
    await client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        {
            "metadata": admin_metadata("redis-admin", "127.0.0.1", "redis"),
            "stringData": {"username": "default", "password": ""},  # the test Redis: nopass
        },
    )
    for name in ("tenant-a", "tenant-b"):
        manifest = stack_manifest(name, f"{fresh_names}_{name[-1]}", write_pg, read_pg, "x")
        manifest["spec"]["redis"] = {"url": redis_server.url, "adminSecret": "redis-admin"}
        await stacks.create(manifest)
    await stacks.create(
        stack_manifest("tenant-c", f"{fresh_names}_c", write_pg, read_pg, redis_server.url)
    )
    for name in ("tenant-a", "tenant-b"):
        obj = await stacks.wait_ready(name, operator)
        isolation = {c["type"]: c for c in obj["status"]["conditions"]}["RedisIsolation"]
        assert isolation["status"] == "True"
        await wait_event(kube_api, namespace, name, "AclUserCreated", operator)
    await stacks.wait_condition(
        "tenant-c", "RedisIsolation", "False", "NoAdminCredentials", operator
    )

    a_url = (await secret_data(kube_api, namespace, "tenant-a-credentials"))["REDIS_URL"]
    assert a_url.startswith(f"redis://cqrs.{namespace}.tenant-a:")
    own, other = f"{namespace}.tenant-a-events", f"{namespace}.tenant-b-events"
    pods = Redis.from_url(a_url)
    admin = Redis.from_url(redis_server.url)
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
    await stacks.create(stack_manifest("legacy", fresh_names, write_pg, read_pg, redis_server.url))
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
    assert creds["username"] == old_role
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

"""The operator against a real kube-apiserver, real PostgreSQL and real Redis.

There is no kubelet or controller-manager: no pod runs and no garbage collector removes
children, so WorkloadsReady means "applied and matching the spec" (see cqrs_operator.status).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.asyncio import Redis

from tests.operator.fixtures_operator import (
    ADMIN_SECRETS,
    Env,
    Stacks,
    database_exists,
    names,
    role_exists,
    stack_manifest,
    wait_until,
)
from tests.operator.kubelet_standin import run_migration_jobs

# Server fixtures come from tests/conftest.py, kube_apiserver from tests/operator/conftest.py.

DEPLOYMENTS = ("write-api", "read-api", "projector")
SERVICES = ("write-api", "read-api")


async def children(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """Every child object of stack ``name`` as a dict, keyed by kind/name."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    out: dict[str, Any] = {}
    for comp in DEPLOYMENTS:
        out[f"Deployment/{name}-{comp}"] = await apps.read_namespaced_deployment(
            f"{name}-{comp}", ns
        )
    for comp in SERVICES:
        out[f"Service/{name}-{comp}"] = await core.read_namespaced_service(f"{name}-{comp}", ns)
    out[f"ConfigMap/{name}-config"] = await core.read_namespaced_config_map(f"{name}-config", ns)
    out[f"Secret/{name}-credentials"] = await core.read_namespaced_secret(f"{name}-credentials", ns)
    return {k: api.sanitize_for_serialization(v) for k, v in out.items()}


def secret_data(obj: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


async def test_create_provisions_databases_stream_and_children(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("orders"))
    stack = await env.stacks.wait_ready("orders", env.operator)
    status = stack["status"]
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == stack["metadata"]["generation"]
    conds = conditions(stack)
    for kind in ("DatabasesReady", "MigrationsApplied", "StreamReady", "WorkloadsReady", "Ready"):
        assert conds[kind]["status"] == "True", conds[kind]
        assert conds[kind]["lastTransitionTime"]

    objs = await children(env.api, env.namespace, "orders")
    for key, obj in objs.items():
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
            ("CqrsStack", "orders", stack["metadata"]["uid"], True)
        ], key

    # The role logs in with the Secret's password; both schemas are migrated.
    creds = secret_data(objs["Secret/orders-credentials"])
    role, password = creds["username"], creds["password"]
    assert role == names(env.namespace, "orders").role
    for server, db in ((env.write_pg, f"w_{env.fresh}"), (env.read_pg, f"r_{env.fresh}")):
        conn = await asyncpg.connect(server.url(db, role, password))
        try:
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") >= 1
            assert (
                await conn.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", db
                )
                == role
            )
        finally:
            await conn.close()
    # Status says which image migrated them and that both are at what that image expects.
    recorded = status["databases"]
    assert recorded["migratedImage"] == "cqrs-stack:0.1.0"
    assert "migratedBy" not in recorded
    assert recorded["expectedSchemaVersions"] == recorded["schemaVersions"], recorded
    assert min(recorded["expectedSchemaVersions"].values()) >= 1, recorded
    assert creds["WRITE_DB_URL"] == env.write_pg.url(f"w_{env.fresh}", role, password)
    assert creds["READ_DB_URL"] == env.read_pg.url(f"r_{env.fresh}", role, password)

    redis = Redis.from_url(env.redis.url)
    try:
        groups = await redis.xinfo_groups(f"{env.namespace}.orders-events")
        assert [g["name"] for g in groups] == [b"projectors"]
    finally:
        await redis.aclose()

    # The children say what the spec says.
    for comp, replicas in (("write-api", 2), ("read-api", 2), ("projector", 1)):
        dep = objs[f"Deployment/orders-{comp}"]
        assert dep["spec"]["replicas"] == replicas
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "cqrs-stack:0.1.0"
        assert container["args"][0] == comp
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (
        objs["ConfigMap/orders-config"]["data"]["EVENT_STREAM_NAME"]
        == f"{env.namespace}.orders-events"
    )
    assert (
        objs["Service/orders-read-api"]["spec"]["selector"]["app.kubernetes.io/component"]
        == "read-api"
    )

    # The password is nowhere but in the Secret: not in status, annotations, config, events.
    events = await client.CoreV1Api(env.api).list_namespaced_event(env.namespace)
    visible = json.dumps(
        [stack, objs["ConfigMap/orders-config"], env.api.sanitize_for_serialization(events)]
    )
    assert password not in visible
    assert password not in env.operator.log_text()

    # Lag is reported by the timer.
    async def lag_reported() -> bool:
        obj = await env.stacks.get("orders")
        return obj is not None and (obj["status"].get("projector") or {}).get("lag") == 0

    await wait_until(lag_reported, timeout=20, what="status.projector.lag")


async def test_update_rolls_children_and_a_second_reconcile_changes_nothing(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("shop"))
    await env.stacks.wait_ready("shop", env.operator)
    before = await children(env.api, env.namespace, "shop")

    await env.stacks.patch(
        "shop",
        {
            "spec": {
                "writeApi": {"replicas": 3},
                "readApi": {"replicas": 4},
                "projector": {"replicas": 2, "batchSize": 100},
                "image": {"tag": "0.2.0"},
            }
        },
    )
    await env.stacks.wait_ready("shop", env.operator)
    after = await children(env.api, env.namespace, "shop")
    for comp, replicas in (("write-api", 3), ("read-api", 4), ("projector", 2)):
        old, new = before[f"Deployment/shop-{comp}"], after[f"Deployment/shop-{comp}"]
        assert new["spec"]["replicas"] == replicas
        assert new["spec"]["template"]["spec"]["containers"][0]["image"] == "cqrs-stack:0.2.0"
        old_hash = old["spec"]["template"]["metadata"]["annotations"]["cqrs.dev/config-hash"]
        new_hash = new["spec"]["template"]["metadata"]["annotations"]["cqrs.dev/config-hash"]
        # Only the projector reads the batch size: its pods roll for it (the APIs for the image).
        assert (old_hash != new_hash) == (comp == "projector"), comp
    assert after["ConfigMap/shop-config"]["data"]["PROJECTOR_BATCH_SIZE"] == "100"
    # The password stays the same across reconciles.
    assert (
        secret_data(after["Secret/shop-credentials"])["password"]
        == secret_data(before["Secret/shop-credentials"])["password"]
    )

    # Trigger another reconcile with a change that renders nothing new: children untouched.
    versions = {k: v["metadata"]["resourceVersion"] for k, v in after.items()}
    await env.stacks.patch("shop", {"metadata": {"annotations": {"example.com/touch": "1"}}})

    async def handled() -> bool:
        obj = await env.stacks.get("shop")
        base = (
            (obj or {})
            .get("metadata", {})
            .get("annotations", {})
            .get("cqrs.dev/last-handled-configuration", "")
        )
        return "example.com/touch" in base

    await wait_until(
        handled,
        timeout=30,
        what="reconcile of the annotation change",
        alive=env.operator.exit_reason,
    )
    again = await children(env.api, env.namespace, "shop")
    assert {k: v["metadata"]["resourceVersion"] for k, v in again.items()} == versions


async def test_drifted_replicas_are_restored(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("drift"))
    await env.stacks.wait_ready("drift", env.operator)
    apps = client.AppsV1Api(env.api)
    await apps.patch_namespaced_deployment(
        "drift-read-api", env.namespace, {"spec": {"replicas": 7}}
    )

    async def restored() -> bool:
        dep = await apps.read_namespaced_deployment("drift-read-api", env.namespace)
        return dep.spec.replicas == 2

    await wait_until(
        restored, timeout=30, what="read-api replicas back to 2", alive=env.operator.exit_reason
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"writeApi": {"replicas": 51}}, "spec.writeApi.replicas"),
        ({"projector": {"batchSize": 0}}, "spec.projector.batchSize"),
        ({"deletionPolicy": "Destroy"}, "spec.deletionPolicy"),
        ({"redis": {}}, "spec.redis"),
        (
            {"projector": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
            "spec.projector.autoscaling.minReplicas",
        ),
        (
            {"writeApi": {"podLabels": {"cqrs.dev/migration-job": "orders-migrate-1"}}},
            "spec.writeApi.podLabels",
        ),
        ({"projector": {"podLabels": {"pod-template-hash": "x"}}}, "spec.projector.podLabels"),
        (
            {"migrationJob": {"podLabels": {"batch.kubernetes.io/job-name": "x"}}},
            "spec.migrationJob.podLabels",
        ),
    ],
)
async def test_invalid_specs_are_refused_by_the_api_server(
    stacks: Stacks,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
    spec: dict[str, Any],
    field: str,
) -> None:
    manifest = stack_manifest("bad", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    manifest["spec"].update(spec)
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422
    assert field in refused.value.body


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda s: s["databases"]["write"].update(database="Bad-Name"),
            "spec.databases.write.database",
        ),
        (
            lambda s: s["databases"]["read"].update(adminSecret="Not_Valid"),
            "spec.databases.read.adminSecret",
        ),
        (lambda s: s["databases"].pop("read"), "spec.databases.read"),
    ],
)
async def test_invalid_database_fields_are_refused(
    stacks: Stacks,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
    mutate: Any,
    field: str,
) -> None:
    manifest = stack_manifest("bad", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    mutate(manifest["spec"])
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422
    assert field in refused.value.body


async def test_over_long_stack_names_are_refused(
    stacks: Stacks, write_pg: Any, read_pg: Any, fresh_names: str
) -> None:
    manifest = stack_manifest("x" * 51, fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422
    assert "metadata.name must be at most 50 characters" in refused.value.body


async def test_defaults_are_filled_by_the_api_server(
    stacks: Stacks,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
) -> None:
    manifest = stack_manifest("defaults", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    for key in ("image", "writeApi", "readApi", "projector"):
        manifest["spec"].pop(key)
    created = await stacks.create(manifest)
    spec = created["spec"]
    # No tag default: a stack that pins none runs the operator's version (moves with it).
    assert spec["image"] == {"repository": "cqrs-stack", "pullPolicy": "IfNotPresent"}
    assert spec["projector"]["batchSize"] == 500
    assert spec["readModels"] == [{"name": "records", "version": 1}]
    assert spec["databases"]["pool"] == {"minSize": 1, "maxSize": 10}
    assert spec["stream"]["consumerGroup"] == "projectors"
    assert spec["deletionPolicy"] == "Retain"
    await stacks.delete("defaults")  # no operator watches here: no finalizer to wait for


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
async def test_delete_honours_the_deletion_policy(
    env: Env,
    policy: str,
) -> None:
    await env.stacks.create(env.manifest("gone", deletionPolicy=policy))
    stack = await env.stacks.wait_ready("gone", env.operator)
    assert "cqrs.dev/finalizer" in stack["metadata"]["finalizers"]
    role = names(env.namespace, "gone").role
    await env.stacks.delete("gone")
    await env.stacks.wait_gone("gone", env.operator)

    kept = policy == "Retain"
    assert await database_exists(env.write_pg, f"w_{env.fresh}") is kept
    assert await database_exists(env.read_pg, f"r_{env.fresh}") is kept
    assert await role_exists(env.write_pg, role) is kept
    assert await role_exists(env.read_pg, role) is kept
    redis = Redis.from_url(env.redis.url)
    try:
        assert bool(await redis.exists(f"{env.namespace}.gone-events")) is kept
    finally:
        await redis.aclose()


async def test_unreachable_database_is_reported_and_retried(
    env: Env,
) -> None:
    from cqrs_stack.localservers import free_port

    manifest = env.manifest("later")
    manifest["spec"]["databases"]["write"]["port"] = free_port()  # nothing listens there
    await env.stacks.create(manifest)

    async def reported() -> dict[str, Any] | None:
        obj = await env.stacks.get("later")
        conds = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions") or []}
        db = conds.get("DatabasesReady", {})
        return obj if db.get("reason") == "DatabaseUnreachable" else None

    obj = await wait_until(
        reported, timeout=30, what="DatabasesReady=False", alive=env.operator.exit_reason
    )
    assert obj["status"]["phase"] == "Degraded"  # transient: retried, not Failed
    assert conditions(obj)["Ready"]["status"] == "False"
    assert "cannot reach PostgreSQL" in conditions(obj)["DatabasesReady"]["message"]

    await env.stacks.patch("later", {"spec": {"databases": {"write": {"port": env.write_pg.port}}}})
    await env.stacks.wait_ready("later", env.operator)
    assert env.operator.exit_reason() is None


async def test_restart_in_the_middle_of_provisioning_converges(
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
    """Hold a lock on the stack's role so provisioning blocks; kill -9 the operator there.

    The role exists beforehand without an owner marker, so the stack adopts it explicitly.
    """
    role = names(namespace, "restart").role
    blocker = await asyncpg.connect(write_pg.url())
    try:
        await blocker.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'placeholder-password-0'")
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute(f"ALTER ROLE {role} CONNECTION LIMIT 100")  # row lock held

        for secret in ADMIN_SECRETS:  # the platform allows adoption of the unmarked role
            await client.CoreV1Api(kube_api).patch_namespaced_secret(
                secret, namespace, {"metadata": {"annotations": {"cqrs.dev/allow-adopt": "true"}}}
            )
        first = operator_factory(kube_apiserver.kubeconfig, namespace)
        await stacks.create(
            stack_manifest("restart", fresh_names, write_pg, read_pg, redis_server.url, adopt=True)
        )

        async def operator_blocked() -> bool:
            # A fresh connection: inside the blocker's transaction the view is a snapshot.
            probe = await asyncpg.connect(write_pg.url())
            try:
                waiting = await probe.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'cqrs-stack-operator' AND wait_event_type = 'Lock'"
                )
            finally:
                await probe.close()
            return bool(waiting)

        await wait_until(
            operator_blocked,
            timeout=30,
            what="operator blocked on the role",
            alive=first.exit_reason,
        )
        password = secret_data(
            kube_api.sanitize_for_serialization(
                await client.CoreV1Api(kube_api).read_namespaced_secret(
                    "restart-credentials", namespace
                )
            )
        )["password"]
        first.kill()
        obj = await stacks.get("restart")
        assert obj is not None
        assert (obj.get("status") or {}).get("phase") != "Ready"
        await locked.rollback()
    finally:
        await blocker.close()

    second = operator_factory(kube_apiserver.kubeconfig, namespace)
    await stacks.wait_ready("restart", second)
    objs = await children(kube_api, namespace, "restart")
    creds = secret_data(objs["Secret/restart-credentials"])
    assert creds["password"] == password  # the password survived the crash
    conn = await asyncpg.connect(write_pg.url(f"w_{fresh_names}", role, password))
    await conn.close()


async def test_projector_scales_with_stream_lag(
    env: Env,
) -> None:
    """Autoscaling on a real stream: a backlog scales the projector up, a drained one down."""
    auto = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetLag": 10,
        # No stabilisation: every reading is followed (the windows have their own test).
        "scaleUpWindowSeconds": 0,
        "scaleDownWindowSeconds": 0,
    }
    manifest = env.manifest(
        "scaled",
        projector={"replicas": 1, "batchSize": 100, "autoscaling": auto},
    )
    await env.stacks.create(manifest)
    await env.stacks.wait_ready("scaled", env.operator)
    apps = client.AppsV1Api(env.api)
    redis = Redis.from_url(env.redis.url)
    stream = f"{env.namespace}.scaled-events"
    try:
        for i in range(25):  # no projector pod runs here: the entries stay undelivered
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})

        async def replicas(wanted: int) -> bool:
            deployment = await apps.read_namespaced_deployment("scaled-projector", env.namespace)
            return deployment.spec.replicas == wanted

        await wait_until(
            lambda: replicas(3),
            timeout=30,
            what="3 projectors for a lag of 25",
            alive=env.operator.exit_reason,
        )

        async def lag_reported() -> bool:
            # The status patch lands after the Deployment is applied: wait for it too.
            stack = await env.stacks.get("scaled")
            projector = ((stack or {}).get("status") or {}).get("projector") or {}
            return int(projector.get("lag") or 0) >= 25

        await wait_until(
            lag_reported,
            timeout=30,
            what="status.projector.lag >= 25",
            alive=env.operator.exit_reason,
        )
        await redis.xgroup_setid(stream, "projectors", "$")  # the backlog is consumed
        await wait_until(
            lambda: replicas(1),
            timeout=30,
            what="back to 1 projector at no lag",
            alive=env.operator.exit_reason,
        )
    finally:
        await redis.aclose()


async def test_the_first_deployments_wait_for_the_stream(
    env: Env,
    redis_factory: Any,
) -> None:
    """Pods create the stream themselves at start: had they started before the operator
    marked it (Redis not up yet), the stack would find it unmarked and refuse it for good."""
    redis = redis_factory()
    redis.stop()
    await env.stacks.create(env.manifest("late", redis_url=redis.url))
    obj = await env.stacks.wait_condition(
        "late", "StreamReady", "False", "RedisUnreachable", env.operator
    )
    conds = conditions(obj)
    assert conds["WorkloadsReady"]["reason"] == "WaitingForStream", conds
    assert obj["status"]["phase"] == "Degraded", obj["status"]  # transient: retried
    apps = client.AppsV1Api(env.api)
    for component in DEPLOYMENTS:
        with pytest.raises(ApiException) as missing:
            await apps.read_namespaced_deployment(f"late-{component}", env.namespace)
        assert missing.value.status == 404

    redis.start()
    ready = await env.stacks.wait_ready("late", env.operator)
    owner = Redis.from_url(redis.url)
    try:
        marker = await owner.get(f"{env.namespace}.late-events:owner")
    finally:
        await owner.aclose()
    assert marker is not None and ready["metadata"]["uid"].encode() in marker
    await apps.read_namespaced_deployment("late-write-api", env.namespace)


async def test_a_deployment_the_api_server_refuses_fails_the_stack_with_the_cause(
    env: Env,
) -> None:
    # Valid for the CRD, invalid in a Pod: an empty key needs operator Exists.
    await env.stacks.create(
        env.manifest("tol", writeApi={"replicas": 1, "tolerations": [{"effect": "NoSchedule"}]})
    )
    await wait_until(
        lambda: run_migration_jobs(env.api, env.namespace, "tol"),
        timeout=30,
        what="the migration Job run",
        alive=env.operator.exit_reason,
    )
    obj = await env.stacks.wait_condition(
        "tol", "WorkloadsReady", "False", reason="ApplyInvalid", operator=env.operator
    )
    message = next(
        c["message"] for c in obj["status"]["conditions"] if c["type"] == "WorkloadsReady"
    )
    assert "Deployment tol-write-api" in message and "HTTP 422" in message
    assert "spec.template.spec.tolerations[0].operator" in message, message
    assert obj["status"]["phase"] == "Failed"
    # Fixed in the spec, the same stack goes on.
    fixed = [{"effect": "NoSchedule", "operator": "Exists"}]
    await env.stacks.patch("tol", {"spec": {"writeApi": {"tolerations": fixed}}})
    await env.stacks.wait_condition("tol", "WorkloadsReady", "True", operator=env.operator)

"""Upgrades against the real API server: the migration Job of the stack's own image, the
Deployments rolled only after it succeeded, the schema version in status, per-component
config hashes.

No kubelet runs here: ``kubelet_standin`` runs a Job's container command (this tree's
``cqrs-stack migrate``) as the kubelet would and records the Job's outcome.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator import __version__, kube, manifests
from cqrs_operator.schema import CRD_VERSION_ANNOTATION
from tests.operator.fixtures_operator import (
    CRD_FILE,
    PERMISSION_DENIED,
    Env,
    Stacks,
    apply_rendered,
    config_hashes,
    render_operator_rbac,
    service_account,
    stack_manifest,
    wait_until,
)
from tests.operator.kubelet_standin import (
    fail_migration_job,
    run_migration_job_when_created,
    run_migration_jobs,
)

APIS = ("write-api", "read-api")


async def template(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    dep = await client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    result: dict[str, Any] = api.sanitize_for_serialization(dep.spec.template)
    return result


async def images(api: client.ApiClient, namespace: str, stack: str) -> set[str]:
    found = set()
    for component in manifests.COMPONENTS:
        tpl = await template(api, namespace, f"{stack}-{component}")
        found.add(tpl["spec"]["containers"][0]["image"])
    return found


async def jobs(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    listed = await client.BatchV1Api(api).list_namespaced_job(namespace)
    return {j.metadata.name: j for j in listed.items}


async def test_projector_only_setting_rolls_only_the_projector(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("batch"))
    await env.stacks.wait_ready("batch", env.operator)
    before = {c: await template(env.api, env.namespace, f"batch-{c}") for c in manifests.COMPONENTS}

    await env.stacks.patch("batch", {"spec": {"projector": {"batchSize": 100}}})

    async def projector_rolled() -> bool:
        tpl = await template(env.api, env.namespace, "batch-projector")
        return tpl != before["projector"]

    await wait_until(
        projector_rolled, timeout=30, what="projector template", alive=env.operator.exit_reason
    )
    await env.stacks.wait_ready("batch", env.operator)
    for component in APIS:
        assert await template(env.api, env.namespace, f"batch-{component}") == before[component]


async def test_new_image_runs_after_its_migration_job_the_old_one_serves_meanwhile(
    env: Env,
) -> None:
    manifest = env.manifest("up")
    created = await env.stacks.create(manifest)
    # A new stack: no Deployment before its image's migrations succeeded.
    await env.stacks.wait_condition(
        "up", "MigrationsApplied", "False", "MigrationJobRunning", env.operator
    )
    obj = await env.stacks.wait_condition("up", "WorkloadsReady", "False", "WaitingForMigrations")
    assert obj["status"]["phase"] == "Provisioning"
    apps = client.AppsV1Api(env.api)
    assert not (await apps.list_namespaced_deployment(env.namespace)).items
    first = await jobs(env.api, env.namespace)
    [(name, job)] = first.items()
    assert name.startswith("up-migrate-") and len(name) <= 63
    assert job.spec.backoff_limit == manifests.MIGRATION_BACKOFF_LIMIT
    assert job.spec.active_deadline_seconds == manifests.MIGRATION_DEADLINE_SECONDS
    assert job.spec.ttl_seconds_after_finished == manifests.MIGRATION_TTL_SECONDS
    [ref] = job.metadata.owner_references
    assert (ref.kind, ref.uid, ref.controller) == ("CqrsStack", created["metadata"]["uid"], True)
    container = job.spec.template.spec.containers[0]
    assert (container.image, container.args) == ("cqrs-stack:0.1.0", ["migrate"])
    assert {e.name for e in container.env} >= {"WRITE_DB_URL", "READ_DB_URL"}
    assert "REDIS_URL" not in {e.name for e in container.env}  # the Job needs no Redis

    ready = await env.stacks.wait_ready("up", env.operator)
    dbs = ready["status"]["databases"]
    assert dbs["migratedImage"] == "cqrs-stack:0.1.0"
    assert dbs["schemaVersions"] == dbs["expectedSchemaVersions"], dbs
    assert min(dbs["schemaVersions"].values()) >= 1
    assert await images(env.api, env.namespace, "up") == {"cqrs-stack:0.1.0"}

    # A new image: its Job runs first; the Deployments keep the old image meanwhile.
    await env.stacks.patch("up", {"spec": {"image": {"tag": "0.2.0"}}})
    await env.stacks.wait_condition(
        "up", "MigrationsApplied", "False", "MigrationJobRunning", env.operator
    )

    async def second_job() -> bool:
        return len(await jobs(env.api, env.namespace)) == 2

    await wait_until(second_job, timeout=30, what="the 0.2.0 Job", alive=env.operator.exit_reason)
    # The reconcile of the new generation applied the old image (and keeps doing so).
    patched = await env.stacks.get("up")
    assert patched is not None

    async def old_image_applied() -> bool:
        cond = (await env.stacks.conditions("up")).get("WorkloadsReady", {})
        return (
            cond.get("observedGeneration") == patched["metadata"]["generation"]
            and "image cqrs-stack:0.1.0" in cond.get("message", "")
            and cond.get("status") == "True"
        )

    await wait_until(old_image_applied, timeout=30, what="the old image applied")
    assert await images(env.api, env.namespace, "up") == {"cqrs-stack:0.1.0"}
    now = await jobs(env.api, env.namespace)
    assert now[name].metadata.uid == first[name].metadata.uid  # one Job per image, kept
    events = await client.CoreV1Api(env.api).list_namespaced_event(env.namespace)
    created_jobs = [e for e in events.items if e.reason == "MigrationJobCreated"]
    assert len(created_jobs) == 2, [e.message for e in created_jobs]

    assert await run_migration_jobs(env.api, env.namespace, "up") == 1
    ready = await env.stacks.wait_ready("up", env.operator)
    assert ready["status"]["databases"]["migratedImage"] == "cqrs-stack:0.2.0"
    assert await images(env.api, env.namespace, "up") == {"cqrs-stack:0.2.0"}


async def test_failed_migration_job_says_why_and_keeps_the_old_image(
    env: Env,
) -> None:
    await env.stacks.create(env.manifest("bad"))
    await env.stacks.wait_ready("bad", env.operator)
    await env.stacks.patch("bad", {"spec": {"image": {"tag": "0.9.0"}}})
    await env.stacks.wait_condition(
        "bad", "MigrationsApplied", "False", "MigrationJobRunning", env.operator
    )
    failure = 'migration write/0009_x failed: relation "commands" already exists'
    assert await fail_migration_job(env.api, env.namespace, "bad", failure) == 1

    obj = await env.stacks.wait_condition("bad", "MigrationsApplied", "False", "MigrationJobFailed")
    cond = {c["type"]: c for c in obj["status"]["conditions"]}
    message = cond["MigrationsApplied"]["message"]
    assert "BackoffLimitExceeded" in message and "Error, exit code 1" in message, message
    assert failure in message
    assert cond["Ready"]["status"] == "False"
    assert cond["Ready"]["reason"] == "MigrationJobFailed"
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["databases"]["migratedImage"] == "cqrs-stack:0.1.0"
    assert await images(env.api, env.namespace, "bad") == {"cqrs-stack:0.1.0"}

    async def warned() -> bool:
        events = await client.CoreV1Api(env.api).list_namespaced_event(env.namespace)
        return any(e.reason == "MigrationJobFailed" and e.type == "Warning" for e in events.items)

    await wait_until(warned, timeout=30, what="Warning Event MigrationJobFailed")


async def test_schema_behind_the_image_is_not_ready(
    env: Env,
) -> None:
    """A database restored from before the last migration is behind the image: not Ready."""
    await env.stacks.create(env.manifest("behind"))
    ready = await env.stacks.wait_ready("behind", env.operator)
    head = ready["status"]["databases"]["expectedSchemaVersions"]["write"]
    conn = await asyncpg.connect(env.write_pg.url(f"w_{env.fresh}"))
    try:
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", head)
    finally:
        await conn.close()

    obj = await env.stacks.wait_condition("behind", "MigrationsApplied", "False", "SchemaMismatch")
    cond = {c["type"]: c for c in obj["status"]["conditions"]}
    assert f"databases at write={head - 1} " in cond["MigrationsApplied"]["message"]
    assert cond["Ready"]["status"] == "False"


async def test_a_stack_without_a_tag_runs_the_operators_version_and_moves_with_it(
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
    first = operator_factory(kube_apiserver.kubeconfig, namespace, "--image-tag", "0.3.0")
    manifest = stack_manifest(
        "follow", fresh_names, write_pg, read_pg, redis_server.url, image={"pullPolicy": "Never"}
    )
    stored = await stacks.create(manifest)
    assert "tag" not in stored["spec"]["image"]  # no default frozen into the stack
    await stacks.wait_ready("follow", first)
    assert await images(kube_api, namespace, "follow") == {"cqrs-stack:0.3.0"}

    first.stop()  # the operator is upgraded
    second = operator_factory(kube_apiserver.kubeconfig, namespace, "--image-tag", "0.4.0")
    # The stack is still Ready on 0.3.0 (its spec did not change): wait for the new version.
    await run_migration_job_when_created(kube_api, namespace, "follow")

    async def moved() -> bool:
        obj = await stacks.get("follow") or {}
        migrated = (obj.get("status") or {}).get("databases", {}).get("migratedImage")
        return migrated == "cqrs-stack:0.4.0"

    await wait_until(moved, timeout=30, what="migrated to 0.4.0", alive=second.exit_reason)
    await stacks.wait_ready("follow", second)
    assert await images(kube_api, namespace, "follow") == {"cqrs-stack:0.4.0"}
    assert len(await jobs(kube_api, namespace)) == 2  # each version migrated by its own image


async def test_the_operator_applies_its_crd_at_start_and_may_touch_no_other(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    operator_factory: Any,
) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    name = yaml.safe_load(CRD_FILE.read_text())["metadata"]["name"]
    path = "/spec/versions/0/schema/openAPIV3Schema/description"
    await ext.patch_custom_resource_definition(
        name,
        [{"op": "replace", "path": path, "value": "an older CRD"}],
        _content_type="application/json-patch+json",
    )
    docs = render_operator_rbac(namespace)
    await apply_rendered(kube_api, docs)
    token = kube_apiserver.create_token(*service_account(docs))
    kubeconfig = kube_apiserver.kubeconfig_for_token(token)
    operator = operator_factory(kubeconfig, namespace, "--crd", str(CRD_FILE))
    wanted = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]

    async def applied() -> bool:
        live = api_dict(kube_api, await ext.read_custom_resource_definition(name))
        managers = {(m["manager"], m["operation"]) for m in live["metadata"]["managedFields"]}
        schema_now = live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
        return ("cqrs-stack", "Apply") in managers and schema_now == (
            wanted["openAPIV3Schema"]["description"]
        )

    await wait_until(applied, timeout=30, what="the CRD applied", alive=operator.exit_reason)
    assert not PERMISSION_DENIED.search(operator.log_text()), operator.log_tail()
    sa_api = await config.new_client_from_config(config_file=str(kubeconfig))
    try:
        other = client.ApiextensionsV1Api(sa_api)
        with pytest.raises(ApiException) as denied:
            await other.patch_custom_resource_definition(
                "others.example.com", {"metadata": {"labels": {"x": "y"}}}
            )
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            await other.delete_custom_resource_definition(name)
        assert denied.value.status == 403
    finally:
        await sa_api.close()


def api_dict(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


async def _write_api_image(env: Env, stack: str) -> str:
    dep = await client.AppsV1Api(env.api).read_namespaced_deployment(
        f"{stack}-write-api", env.namespace
    )
    image: str = dep.spec.template.spec.containers[0].image
    return image


async def test_a_rollback_below_the_schema_never_rolls_the_deployments(env: Env) -> None:
    """An older image whose Job succeeds but expects a lower schema: SchemaMismatch, and the
    Deployments stay on the image they run, in this reconcile and the next ones (found by an
    attack: the second reconcile rolled them to the older image over the newer schema)."""
    import json

    from tests.operator.kubelet_standin import _record, pending_jobs

    await env.stacks.create(
        env.manifest("back", image={"repository": "cqrs-stack", "tag": "2.0.0"})
    )
    obj = await env.stacks.wait_ready("back", env.operator)
    have = obj["status"]["databases"]["schemaVersions"]
    older = {"expectedSchemaVersions": {"write": have["write"] - 1, "read": have["read"] - 1}}
    await env.stacks.patch("back", {"spec": {"image": {"tag": "1.0.0"}}})
    jobs = await wait_until(
        lambda: pending_jobs(env.api, env.namespace, "back"), timeout=30, what="the Job"
    )
    await _record(env.api, env.namespace, jobs[0], 0, json.dumps(older))
    await env.stacks.wait_condition(
        "back", "MigrationsApplied", "False", "SchemaMismatch", env.operator
    )
    for _ in range(6):  # several reconciles (bounded): the choice holds
        await env.stacks.mark_available("back")
        assert (await _write_api_image(env, "back")).endswith(":2.0.0")
        await asyncio.sleep(1)
    status = (await env.stacks.get("back"))["status"]
    assert status["databases"].get("migratedImage", "").endswith(":2.0.0")


async def test_a_planted_job_of_the_operators_name_is_not_taken_for_the_migration(
    env: Env,
) -> None:
    """A tenant who may create Jobs plants the next image's migration Job (the operator's
    name, owner reference, annotation) running `true`: refused as MigrationJobNotOurs, and no
    Deployment runs that image (found by an attack)."""
    from cqrs_operator import spec as stack_spec
    from tests.operator.kubelet_standin import _record

    m = env.manifest("planted")
    await env.stacks.create(m)
    obj = await env.stacks.wait_ready("planted", env.operator)
    uid = obj["metadata"]["uid"]
    nxt = {**m["spec"], "image": {"repository": "cqrs-stack", "tag": "9.9.9"}}
    typed = stack_spec.parse_spec(
        nxt, namespace=env.namespace, name="planted", uid=uid, status=obj.get("status")
    )
    rendered = manifests.migration_job(typed)
    forged = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": manifests.migration_job_name(typed),
            "labels": rendered["metadata"]["labels"],
            "annotations": rendered["metadata"].get("annotations"),
            "ownerReferences": [
                {
                    "apiVersion": "cqrs.dev/v1alpha1",
                    "kind": "CqrsStack",
                    "name": "planted",
                    "uid": uid,
                    "controller": True,
                }
            ],
        },
        "spec": {
            "template": {
                "metadata": {"labels": rendered["spec"]["template"]["metadata"]["labels"]},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "migrate", "image": "busybox", "command": ["true"]}],
                },
            }
        },
    }
    job = await client.BatchV1Api(env.api).create_namespaced_job(env.namespace, forged)
    await _record(env.api, env.namespace, job, 0, "")
    await env.stacks.patch("planted", {"spec": {"image": {"tag": "9.9.9"}}})
    await env.stacks.wait_condition(
        "planted", "MigrationsApplied", "False", "MigrationJobNotOurs", env.operator
    )
    assert not (await _write_api_image(env, "planted")).endswith(":9.9.9")


async def _set_crd_version(api: client.ApiClient, name: str, version: str) -> None:
    await client.ApiextensionsV1Api(api).patch_custom_resource_definition(
        name,
        {"metadata": {"annotations": {CRD_VERSION_ANNOTATION: version}}},
        _content_type="application/merge-patch+json",
    )


async def test_an_older_operator_leaves_a_newer_crd_and_its_fields_alone(
    env: Env, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ext = client.ApiextensionsV1Api(env.api)
    ours = yaml.safe_load(CRD_FILE.read_text())
    name = ours["metadata"]["name"]
    assert ours["metadata"]["annotations"][CRD_VERSION_ANNOTATION] == __version__
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 3}
    await env.stacks.create(env.manifest("newer", writeApi={"replicas": 1, "autoscaling": auto}))
    # The CRD of an older release: it has no writeApi.autoscaling.
    older = yaml.safe_load(CRD_FILE.read_text())
    spec_schema = older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["properties"]["writeApi"]["properties"].pop("autoscaling")
    older_file = tmp_path / "older-crd.yaml"

    def write_api_schema(live: Any) -> dict[str, Any]:
        props = live.spec.versions[0].schema.open_apiv3_schema.properties["spec"].properties
        return dict(props["writeApi"].properties)

    try:
        # 0.10.0 > 0.9.1 (not as strings): the live CRD is newer, the older one is skipped.
        await _set_crd_version(env.api, name, "0.10.0")
        older["metadata"]["annotations"][CRD_VERSION_ANNOTATION] = "0.9.1"
        older_file.write_text(yaml.safe_dump(older))
        with caplog.at_level("WARNING", logger="cqrs_operator.kube"):
            assert not await kube.apply_crd(env.api, str(older_file))
        assert "live_version=0.10.0 file_version=0.9.1" in caplog.text
        assert "newer release" in caplog.text
        assert "autoscaling" in write_api_schema(await ext.read_custom_resource_definition(name))
        await env.stacks.patch("newer", {"metadata": {"annotations": {"touch": "1"}}})
        stored = await env.stacks.get("newer")
        assert stored is not None and stored["spec"]["writeApi"]["autoscaling"]["enabled"]
        # Equal or newer than the live one (or a live one from before the annotation): applied.
        older["metadata"]["annotations"][CRD_VERSION_ANNOTATION] = "0.10.0"
        older_file.write_text(yaml.safe_dump(older))
        assert await kube.apply_crd(env.api, str(older_file))
        live = await ext.read_custom_resource_definition(name)
        assert "autoscaling" not in write_api_schema(live)
    finally:
        await _set_crd_version(env.api, name, __version__)
        assert await kube.apply_crd(env.api, str(CRD_FILE))
    assert "autoscaling" in write_api_schema(await ext.read_custom_resource_definition(name))


async def test_a_new_value_in_a_secret_or_config_map_the_pods_read_rolls_their_component(
    env: Env,
) -> None:
    core = client.CoreV1Api(env.api)
    opted_in = {"cqrs.dev/stack-secret": "true"}
    old_token, new_token = "old-token-" + "a" * 22, "new-token-" + "b" * 22
    await core.create_namespaced_secret(
        env.namespace,
        {"metadata": {"name": "wtok", "labels": opted_in}, "stringData": {"token": old_token}},
    )
    await core.create_namespaced_config_map(
        env.namespace, {"metadata": {"name": "proj-env"}, "data": {"FEATURE": "on"}}
    )
    manifest = env.manifest(
        "src",
        writeApi={"replicas": 1, "auth": {"tokenSecret": {"name": "wtok", "key": "token"}}},
        projector={"replicas": 1, "envFrom": [{"configMapRef": {"name": "proj-env"}}]},
    )
    await env.stacks.create(manifest)
    await env.stacks.wait_ready("src", env.operator)
    before = await config_hashes(env.api, env.namespace, "src")

    async def rolled(component: str, old: dict[str, str]) -> dict[str, str] | None:
        now = await config_hashes(env.api, env.namespace, "src")
        return now if now[component] != old[component] else None

    # The write token: only write-api reads it.
    await core.patch_namespaced_secret("wtok", env.namespace, {"stringData": {"token": new_token}})
    after_token = await wait_until(
        lambda: rolled("write-api", before),
        timeout=30,
        what="write-api rolled on a new token",
        alive=env.operator.exit_reason,
    )
    assert {c for c in manifests.COMPONENTS if after_token[c] != before[c]} == {"write-api"}
    # An envFrom ConfigMap of the projector: the projector alone.
    await core.patch_namespaced_config_map("proj-env", env.namespace, {"data": {"FEATURE": "off"}})
    after_env = await wait_until(
        lambda: rolled("projector", after_token),
        timeout=30,
        what="projector rolled on a new envFrom value",
        alive=env.operator.exit_reason,
    )
    assert {c for c in manifests.COMPONENTS if after_env[c] != after_token[c]} == {"projector"}
    # Values never reach the templates, logs or the stack's status.
    dep = await client.AppsV1Api(env.api).read_namespaced_deployment("src-write-api", env.namespace)
    shown = str(env.api.sanitize_for_serialization(dep.spec.template.metadata))
    stack = await env.stacks.get("src")
    for value in (old_token, new_token):
        assert value not in shown and value not in str(stack)
        assert value not in env.operator.log_text()

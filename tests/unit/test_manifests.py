"""Rendering a stack's objects: pure functions of the spec, checked without a cluster."""

from __future__ import annotations

import base64

from cqrs_operator import manifests
from cqrs_operator.spec import identity_hash, parse_spec


def stack(**overrides):
    spec = {
        "databases": {
            "write": {"host": "pg-write.db", "adminSecret": "pg-admin"},
            "read": {"host": "pg-read.db", "port": 5433, "adminSecret": "pg-admin"},
        },
        "redis": {"url": "redis://redis.db:6379/0"},
        "writeApi": {"replicas": 2},
        "readApi": {"replicas": 3},
        "projector": {"replicas": 2, "batchSize": 250},
    }
    spec.update(overrides)
    return parse_spec(spec, namespace="shop", name="orders")


def by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_workloads_are_three_deployments_two_services_and_two_budgets() -> None:
    objs = by_name(manifests.workloads(stack(), "abc", 2))
    assert set(objs) == {
        ("Deployment", "orders-write-api"),
        ("Deployment", "orders-read-api"),
        ("Deployment", "orders-projector"),
        ("Service", "orders-write-api"),
        ("Service", "orders-read-api"),
        ("PodDisruptionBudget", "orders-write-api"),
        ("PodDisruptionBudget", "orders-read-api"),
    }
    budget = objs[("PodDisruptionBudget", "orders-read-api")]["spec"]
    assert budget["maxUnavailable"] == 1
    assert (
        budget["selector"]["matchLabels"]
        == (objs[("Deployment", "orders-read-api")]["spec"]["selector"]["matchLabels"])
    )
    assert objs[("Deployment", "orders-write-api")]["spec"]["replicas"] == 2
    assert objs[("Deployment", "orders-read-api")]["spec"]["replicas"] == 3
    assert objs[("Deployment", "orders-projector")]["spec"]["replicas"] == 2
    for obj in objs.values():
        assert obj["metadata"]["namespace"] == "shop"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "orders"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cqrs-stack-operator"


def test_deployment_runs_the_component_hardened_with_probes() -> None:
    dep = manifests.deployment(stack(), "projector", 2, "digest1")
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION] == "digest1"
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["image"] == "cqrs-stack:0.1.0"
    assert container["command"] + container["args"] == [
        "cqrs-stack",
        "projector",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"]
    sc = container["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod_sc = pod["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {
        k: {"name": "orders-credentials", "key": k}
        for k in ("WRITE_DB_URL", "READ_DB_URL", "REDIS_URL")
    }
    assert container["envFrom"] == [{"configMapRef": {"name": "orders-config"}}]


def test_config_map_carries_the_settings_names() -> None:
    data = manifests.config_map(stack())["data"]
    assert data["EVENT_STREAM_NAME"] == "shop.orders-events"
    assert data["CONSUMER_GROUP"] == "projectors"
    assert data["PROJECTOR_BATCH_SIZE"] == "250"
    assert "password" not in str(data).lower()


def test_credentials_secret_builds_urls_with_the_role() -> None:
    secret = manifests.credentials_secret(stack(), "p" * 20, "redis://r:6379/0")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    role, digest = (
        f"cqrs_shop_orders_{identity_hash('shop', 'orders')}",
        identity_hash("shop", "orders"),
    )
    assert data["WRITE_DB_URL"] == (
        f"postgresql://{role}:" + "p" * 20 + f"@pg-write.db:5432/shop_orders_{digest}_write"
    )
    assert data["READ_DB_URL"].endswith(f"@pg-read.db:5433/shop_orders_{digest}_read")
    assert data["REDIS_URL"] == "redis://r:6379/0"
    assert data["username"] == role


def test_config_hash_changes_with_config_and_secret_only() -> None:
    base = manifests.config_hash({"A": "1"}, {"p": "x"})
    assert base == manifests.config_hash({"A": "1"}, {"p": "x"})
    assert base != manifests.config_hash({"A": "2"}, {"p": "x"})
    assert base != manifests.config_hash({"A": "1"}, {"p": "y"})


def test_image_tag_change_changes_the_pod_template() -> None:
    old = manifests.deployment(stack(), "write-api", 2, "d")
    new = manifests.deployment(stack(image={"tag": "0.2.0"}), "write-api", 2, "d")
    assert old["spec"]["template"] != new["spec"]["template"]
    assert old["spec"]["selector"] == new["spec"]["selector"]


def test_projector_replicas_follow_lag_within_bounds() -> None:
    auto = stack(
        projector={
            "replicas": 1,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5, "targetLag": 100},
        }
    )
    assert manifests.projector_replicas(auto, 0, None) == 1
    assert manifests.projector_replicas(auto, 250, 1) == 3
    assert manifests.projector_replicas(auto, 10**6, 1) == 5
    assert manifests.projector_replicas(auto, None, 4) == 4
    assert manifests.projector_replicas(stack(), 10**6, None) == 2


def test_services_select_their_deployment_pods() -> None:
    svc = manifests.service(stack(), "read-api")
    dep = manifests.deployment(stack(), "read-api", 1, "d")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_write_token_comes_from_its_secret_and_only_to_the_write_api() -> None:
    spec = stack(writeApi={"replicas": 1, "auth": {"tokenSecret": {"name": "orders-token"}}})
    objs = by_name(manifests.workloads(spec, "abc", 1))

    def env(component: str) -> dict[str, dict]:
        pod = objs[("Deployment", f"orders-{component}")]["spec"]["template"]["spec"]
        return {e["name"]: e for e in pod["containers"][0]["env"]}

    token = env("write-api")["WRITE_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "orders-token", "key": "token"}
    assert "WRITE_API_TOKEN" not in env("read-api") and "WRITE_API_TOKEN" not in env("projector")
    assert "WRITE_API_TOKEN" not in env("write-api") or "value" not in token


def test_no_write_token_by_default() -> None:
    objs = by_name(manifests.workloads(stack(), "abc", 1))
    pod = objs[("Deployment", "orders-write-api")]["spec"]["template"]["spec"]
    assert "WRITE_API_TOKEN" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_database_tls_reaches_the_pods_as_libpq_variables_and_a_mounted_ca() -> None:
    spec = stack()
    plain = manifests.deployment(spec, "read-api", 1, "h")["spec"]["template"]["spec"]
    assert not any(e["name"].startswith("PGSSL") for e in plain["containers"][0]["env"])
    databases = {
        "write": {"host": "pg-write.db", "adminSecret": "pg-admin"},
        "read": {"host": "pg-read.db", "adminSecret": "pg-admin"},
        "tls": {"mode": "verify-ca", "caSecret": {"name": "pg-ca", "key": "root.pem"}},
    }
    pod = manifests.deployment(stack(databases=databases), "projector", 1, "h")["spec"]["template"][
        "spec"
    ]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PGSSLMODE"] == "verify-ca"
    assert env["PGSSLROOTCERT"] == f"{manifests.POSTGRES_CA_DIR}/root.pem"
    volume = next(v for v in pod["volumes"] if v["name"] == "postgresql-ca")
    assert volume["secret"] == {
        "secretName": "pg-ca",
        "items": [{"key": "root.pem", "path": "root.pem"}],
    }


def test_a_projector_only_setting_changes_only_the_projector_hash() -> None:
    secret = {"password": "x"}
    before = manifests.component_hashes(manifests.config_data(stack()), secret)
    changed = stack(projector={"replicas": 2, "batchSize": 251, "maxDeliveries": 7})
    after = manifests.component_hashes(manifests.config_data(changed), secret)
    assert [c for c in manifests.COMPONENTS if before[c] != after[c]] == ["projector"]
    # A setting every component reads rolls them all.
    logged = manifests.component_hashes(manifests.config_data(stack(logLevel="debug")), secret)
    assert all(before[c] != logged[c] for c in manifests.COMPONENTS)


def test_migration_job_is_bounded_named_per_image_and_gets_only_the_database_urls() -> None:
    job = manifests.migration_job(stack())
    assert job["kind"] == "Job"
    assert job["metadata"]["name"] == manifests.migration_job_name(stack())
    assert manifests.migration_job_name(stack()) != manifests.migration_job_name(
        stack(image={"tag": "0.2.0"})
    )
    longest = parse_spec(
        {**stack_spec(), "image": {"tag": "9.9.9"}}, namespace="shop", name="n" * 50
    )
    assert len(manifests.migration_job_name(longest)) <= 63
    spec = job["spec"]
    assert spec["backoffLimit"] == manifests.MIGRATION_BACKOFF_LIMIT
    assert spec["activeDeadlineSeconds"] == manifests.MIGRATION_DEADLINE_SECONDS
    assert spec["ttlSecondsAfterFinished"] == manifests.MIGRATION_TTL_SECONDS
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert (container["image"], container["command"], container["args"]) == (
        "cqrs-stack:0.1.0",
        ["cqrs-stack"],
        ["migrate"],
    )
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {"WRITE_DB_URL", "READ_DB_URL", "LOG_LEVEL", "MIGRATE_REPORT_FILE"}
    assert env["MIGRATE_REPORT_FILE"]["value"] == container["terminationMessagePath"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def stack_spec() -> dict:
    return {
        "databases": {
            "write": {"host": "pg-write.db", "adminSecret": "pg-admin"},
            "read": {"host": "pg-read.db", "adminSecret": "pg-admin"},
        },
        "redis": {"url": "redis://redis.db:6379/0"},
    }

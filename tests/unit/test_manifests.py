"""Rendering a stack's objects: pure functions of the spec, checked without a cluster."""

from __future__ import annotations

import base64

import pytest

from cqrs_operator import manifests
from cqrs_operator.spec import SpecError, identity_hash, parse_spec


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


# ------------------------------------------------------------------ spec fields reach the pods


def test_read_models_and_pool_sizes_reach_the_config_map() -> None:
    data = manifests.config_data(stack())
    assert (data["READ_MODELS"], data["DB_POOL_MIN_SIZE"], data["DB_POOL_MAX_SIZE"]) == (
        "records",
        "1",
        "10",
    )
    spec = stack(readModels=[{"name": "records"}, {"name": "history", "version": 2}])
    spec_dict = {
        "databases": {
            "write": {"host": "pg", "adminSecret": "a"},
            "read": {"host": "pg", "adminSecret": "a"},
            "pool": {"minSize": 3, "maxSize": 30},
        },
        "redis": {"url": "redis://r:6379/0"},
    }
    pooled = parse_spec(spec_dict, namespace="shop", name="orders")
    assert manifests.config_data(spec)["READ_MODELS"] == "records,history"
    assert manifests.config_data(pooled)["DB_POOL_MAX_SIZE"] == "30"


POD_CONTROLS = {
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"pool": "cqrs"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "cqrs", "effect": "NoSchedule"}
    ],
    "topologySpreadConstraints": [
        {
            "maxSkew": 2,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
        }
    ],
    "priorityClassName": "cqrs-high",
    "podAnnotations": {"example.com/scrape": "true"},
    "podLabels": {"team": "orders"},  # reserved keys are refused (test_spec)
    "envFrom": [
        {"configMapRef": {"name": "extra"}},
        {"secretRef": {"name": "vault"}, "prefix": "X_"},
    ],
}


def test_pod_controls_reach_every_deployment_and_ours_win() -> None:
    spec = stack(
        writeApi={"replicas": 1, **POD_CONTROLS},
        readApi={"replicas": 1, **POD_CONTROLS},
        projector={"replicas": 1, **POD_CONTROLS},
    )
    for component in manifests.COMPONENTS:
        dep = manifests.deployment(spec, component, 1, "d")
        pod = dep["spec"]["template"]
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["nodeSelector"] == {"pool": "cqrs"}
        assert pod["spec"]["affinity"] == POD_CONTROLS["affinity"]
        assert pod["spec"]["tolerations"] == [
            {"key": "dedicated", "value": "cqrs", "effect": "NoSchedule"}
        ]
        (spread,) = pod["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
        assert spread["labelSelector"] == {"matchLabels": dep["spec"]["selector"]["matchLabels"]}
        assert pod["spec"]["priorityClassName"] == "cqrs-high"
        assert pod["metadata"]["annotations"]["example.com/scrape"] == "true"
        assert pod["metadata"]["annotations"][manifests.CONFIG_HASH_ANNOTATION] == "d"
        assert pod["metadata"]["labels"]["team"] == "orders"
        # The selector's labels are the operator's: an extra label never changes them.
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "cqrs-stack"
        env_from = pod["spec"]["containers"][0]["envFrom"]
        # The stack's ConfigMap comes last: later sources win, so its settings hold.
        assert env_from == [
            {"configMapRef": {"name": "extra", "optional": False}, "prefix": ""},
            {"secretRef": {"name": "vault", "optional": False}, "prefix": "X_"},
            {"configMapRef": {"name": "orders-config"}},
        ]


def test_replicas_spread_over_nodes_by_default_and_not_when_told() -> None:
    dep = manifests.deployment(stack(), "read-api", 3, "d")
    (spread,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": manifests.selector_labels(stack(), "read-api")},
    }
    bare = manifests.deployment(
        stack(readApi={"replicas": 3, "topologySpreadConstraints": []}), "read-api", 3, "d"
    )
    assert "topologySpreadConstraints" not in bare["spec"]["template"]["spec"]


def test_apply_pod_controls_serves_a_job_template_too() -> None:
    """The migration Job's pod: the same controls, no default spread for one pod."""
    spec = stack(migrationJob={"nodeSelector": {"pool": "jobs"}, "priorityClassName": "batch"})
    template = {"metadata": {"labels": {"job": "migrate"}}, "spec": {"containers": [{"name": "m"}]}}
    pod = manifests.apply_pod_controls(
        template, spec.migration_job, {"job": "migrate"}, spread=False
    )
    assert pod["spec"]["nodeSelector"] == {"pool": "jobs"}
    assert pod["spec"]["priorityClassName"] == "batch"
    assert "topologySpreadConstraints" not in pod["spec"]
    assert template["spec"] == {"containers": [{"name": "m"}]}  # the input is not changed


def test_an_envfrom_entry_takes_one_source() -> None:
    import pytest

    from cqrs_operator.spec import SpecError

    for bad in ({}, {"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}):
        with pytest.raises(SpecError, match=r"spec\.writeApi\.envFrom\.0"):
            stack(writeApi={"envFrom": [bad]})


# ------------------------------------------------------------------ autoscalers


def test_an_autoscaled_api_gets_an_hpa_and_no_replicas() -> None:
    auto = {"enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetCpuUtilization": 60}
    spec = stack(writeApi={"replicas": 2, "autoscaling": auto})
    objs = by_name(
        manifests.workloads(spec, "d", 1) + manifests.autoscalers(spec, "redis://r:6379/0")
    )
    assert "replicas" not in objs[("Deployment", "orders-write-api")]["spec"]
    assert objs[("Deployment", "orders-read-api")]["spec"]["replicas"] == 3
    hpa = objs[("HorizontalPodAutoscaler", "orders-write-api")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "orders-write-api",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    assert ("HorizontalPodAutoscaler", "orders-read-api") not in objs


KEDA = {
    "enabled": True,
    "engine": "keda",
    "minReplicas": 1,
    "maxReplicas": 8,
    "targetLag": 200,
    "scaleUpWindowSeconds": 15,
    "scaleDownWindowSeconds": 120,
}


def test_engine_keda_renders_a_scaled_object_on_the_stacks_stream() -> None:
    spec = stack(projector={"replicas": 1, "autoscaling": KEDA})
    url = "rediss://cqrs.shop.orders:s3cret@redis.db:6380/0?ssl_ca_certs=/etc/ca.crt"
    objs = by_name(manifests.workloads(spec, "d", None) + manifests.autoscalers(spec, url))
    assert "replicas" not in objs[("Deployment", "orders-projector")]["spec"]
    scaled = objs[("ScaledObject", "orders-projector")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": "orders-projector"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 8)
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 15
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 120
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"] == {
        "address": "redis.db:6380",
        "stream": "shop.orders-events",
        "consumerGroup": "projectors",
        "lagCount": "200",
        "databaseIndex": "0",
        "enableTLS": "true",
    }
    assert trigger["authenticationRef"] == {"name": "orders-projector"}
    # The password is in the credentials Secret only, never in a KEDA object.
    auth = objs[("TriggerAuthentication", "orders-projector")]
    assert "s3cret" not in repr(scaled) + repr(auth)
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "username", "name": "orders-credentials", "key": "REDIS_USERNAME"},
        {"parameter": "password", "name": "orders-credentials", "key": "REDIS_PASSWORD"},
    ]
    data = manifests.credentials_data(spec, "pw", url)
    assert (data["REDIS_USERNAME"], data["REDIS_PASSWORD"]) == ("cqrs.shop.orders", "s3cret")


def test_without_a_redis_login_keda_gets_no_trigger_authentication() -> None:
    spec = stack(projector={"replicas": 1, "autoscaling": KEDA})
    objs = by_name(manifests.autoscalers(spec, "redis://redis.db:6379/2"))
    assert set(objs) == {("ScaledObject", "orders-projector")}
    trigger = objs[("ScaledObject", "orders-projector")]["spec"]["triggers"][0]
    assert "authenticationRef" not in trigger
    assert trigger["metadata"]["databaseIndex"] == "2"
    assert trigger["metadata"]["enableTLS"] == "false"
    # The builtin engine and no autoscaling: no extra Secret keys (no rollout of old stacks).
    assert "REDIS_PASSWORD" not in manifests.credentials_data(stack(), "pw", "redis://:x@r:1/0")


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


def test_migration_job_gets_the_pod_controls_and_resources_of_spec_migration_job() -> None:
    spec = stack(
        migrationJob={
            **POD_CONTROLS,
            "resources": {"requests": {"cpu": "200m"}, "limits": {"memory": "1Gi"}},
        }
    )
    job = manifests.migration_job(spec)
    pod = job["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "cqrs"}
    assert pod["spec"]["priorityClassName"] == "cqrs-high"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"] == {
        "matchLabels": {"cqrs.dev/migration-job": job["metadata"]["name"]}
    }
    # The operator's labels win: the Job's pods stay findable by their report's reader.
    assert pod["metadata"]["labels"]["cqrs.dev/migration-job"] == job["metadata"]["name"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "cqrs-stack"
    [container] = pod["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "200m"}, "limits": {"memory": "1Gi"}}
    assert container["envFrom"][0] == {
        "configMapRef": {"name": "extra", "optional": False},
        "prefix": "",
    }
    # One pod: no default spread, and still only the database URLs from the stack.
    plain = manifests.migration_job(stack())["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in plain
    assert plain["containers"][0]["envFrom"] == []


def test_the_hash_covers_the_other_sources_each_component_reads_and_only_those() -> None:
    spec = stack(
        writeApi={"replicas": 1, "auth": {"tokenSecret": {"name": "wtok", "key": "token"}}},
        projector={"replicas": 1, "envFrom": [{"configMapRef": {"name": "proj-env"}}]},
    )
    config, secret = manifests.config_data(spec), {"password": "x"}
    rendered = {
        m["metadata"]["name"]: m
        for m in manifests.workloads(spec, manifests.component_hashes(config, secret), 1)
        if m["kind"] == "Deployment"
    }
    read = {
        name: manifests.external_sources(spec, m["spec"]["template"])
        for name, m in rendered.items()
    }
    # Not the stack's own ConfigMap and credentials Secret: their wanted content is hashed.
    assert read == {
        "orders-write-api": [("Secret", "wtok")],
        "orders-read-api": [],
        "orders-projector": [("ConfigMap", "proj-env")],
    }
    plain = manifests.component_hashes(config, secret)
    assert plain == manifests.component_hashes(config, secret, {})  # no sources: hash kept
    one = manifests.sources_digest({("Secret", "wtok"): "d1"})
    two = manifests.sources_digest({("Secret", "wtok"): "d2"})
    assert one != two and "d1" not in one
    rolled = manifests.component_hashes(config, secret, {"write-api": one})
    assert [c for c in manifests.COMPONENTS if rolled[c] != plain[c]] == ["write-api"]
    assert manifests.component_hashes(config, secret, {"write-api": two}) != rolled


# ------------------------------------------------------------------ spec.tracing

TRACED = {"enabled": True, "endpoint": "http://otel-collector.observability:4318"}


def container_env(objs: dict, component: str) -> dict[str, dict]:
    pod = objs[("Deployment", f"orders-{component}")]["spec"]["template"]["spec"]
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def test_tracing_reaches_every_workload_as_the_sdks_variables() -> None:
    objs = by_name(manifests.workloads(stack(tracing={**TRACED, "sampleRatio": 0.25}), "abc", 1))
    for component in manifests.COMPONENTS:
        env = container_env(objs, component)
        values = {name: e.get("value") for name, e in env.items()}
        assert values["TRACING"] == "true"
        assert values["OTEL_SERVICE_NAME"] == f"orders-{component}"
        assert values["OTEL_EXPORTER_OTLP_ENDPOINT"] == TRACED["endpoint"]
        assert values["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert values["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
        attributes = dict(a.split("=", 1) for a in values["OTEL_RESOURCE_ATTRIBUTES"].split(","))
        assert attributes["service.namespace"] == attributes["k8s.namespace.name"] == "shop"
        assert attributes["k8s.deployment.name"] == f"orders-{component}"
        # The kubelet expands $(VAR) of a variable defined before it: the pod's own name.
        assert attributes["k8s.pod.name"] == f"$({manifests.TRACING_POD_NAME})"
        names = list(env)
        assert names.index(manifests.TRACING_POD_NAME) < names.index("OTEL_RESOURCE_ATTRIBUTES")
        pod_name = env[manifests.TRACING_POD_NAME]["valueFrom"]["fieldRef"]
        assert pod_name["fieldPath"] == "metadata.name"


def test_no_endpoint_renders_a_reference_the_kubelet_would_expand() -> None:
    """A pod's env value expands $(NAME) of the variables before it (WRITE_DB_URL and the other
    Secret-backed URLs come first): an endpoint with one is refused by the spec, so the only
    reference rendered is the pod's own name, in OTEL_RESOURCE_ATTRIBUTES."""
    for endpoint in ("http://c:4318/$(WRITE_DB_URL)", "http://$(REDIS_URL)", "http://c/$$(X)"):
        with pytest.raises(SpecError, match=r"spec\.tracing\.endpoint"):
            stack(tracing={**TRACED, "endpoint": endpoint})
    env = manifests.tracing_env(stack(tracing=TRACED), "write-api")
    references = [e["name"] for e in env if "$" in e.get("value", "")]
    assert references == ["OTEL_RESOURCE_ATTRIBUTES"]


def test_tracing_off_or_unset_puts_no_tracing_variable_in_the_pods() -> None:
    endpoint_kept = {"enabled": False, "endpoint": TRACED["endpoint"]}
    for spec in (stack(), stack(tracing={}), stack(tracing=endpoint_kept)):
        objs = by_name(manifests.workloads(spec, "abc", 1))
        for component in manifests.COMPONENTS:
            names = set(container_env(objs, component))
            assert not {n for n in names if n.startswith("OTEL_")}, names
            assert not names & {"TRACING", manifests.TRACING_POD_NAME}


def test_tracing_stays_out_of_the_migration_job() -> None:
    job = manifests.migration_job(stack(tracing=TRACED))
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e["name"] for e in env if e["name"] == "TRACING" or e["name"].startswith("OTEL_")]


def test_tracing_turned_on_rolls_every_deployment() -> None:
    def templates(spec) -> dict:
        return {
            c: manifests.deployment(spec, c, 1, "h")["spec"]["template"]
            for c in ("write-api", "read-api", "projector")
        }

    off, on = templates(stack()), templates(stack(tracing=TRACED))
    assert all(off[c] != on[c] for c in off)


def test_the_sdk_reads_the_rendered_variables_as_meant(monkeypatch) -> None:
    """The variables the operator renders, read by the OpenTelemetry SDK the image carries: the
    sampler is parent-based on the ratio, the resource names the workload."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider, sampling

    spec = stack(tracing={**TRACED, "sampleRatio": 0.1})
    env = manifests.tracing_env(spec, "projector")
    for entry in env:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
    provider = TracerProvider(resource=Resource.create())
    sampler = provider.sampler
    assert isinstance(sampler, sampling.ParentBased)
    assert "TraceIdRatioBased{0.1}" in sampler.get_description()
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "orders-projector"
    assert attributes["k8s.deployment.name"] == "orders-projector"
    assert attributes["service.version"] == spec.image_tag

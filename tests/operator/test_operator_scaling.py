"""Autoscalers and pod controls against the real API server, with the operator running.

There is no controller-manager here: the tests play the HPA (they set the Deployment's
scale as it would) and read what the operator applied.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.asyncio import Redis

from tests.operator.fixtures_operator import Operator, Stacks, stack_manifest, wait_until
from tests.operator.kubelet_standin import run_migration_job_when_created

HPA = {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetCpuUtilization": 70}


async def replicas(api: client.ApiClient, namespace: str, name: str) -> int | None:
    dep = await client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    return dep.spec.replicas


async def reconciled_after_a_change(stacks: Stacks, name: str, operator: Operator) -> None:
    """Change the spec (the projector's batch size: every Deployment is applied again) and
    wait until the operator handled that generation."""
    obj = await stacks.get(name)
    assert obj is not None
    batch = obj["spec"]["projector"]["batchSize"]
    await stacks.patch(name, {"spec": {"projector": {"batchSize": batch + 1}}})
    await stacks.wait_ready(name, operator)


async def test_an_hpa_owns_the_api_replicas_and_the_operator_does_not_fight_it(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    manifest = stack_manifest("hpa", fresh_names, write_pg, read_pg, redis_server.url)
    manifest["spec"]["writeApi"]["autoscaling"] = HPA
    await stacks.create(manifest)
    await stacks.wait_ready("hpa", operator)
    hpa = await client.AutoscalingV2Api(kube_api).read_namespaced_horizontal_pod_autoscaler(
        "hpa-write-api", namespace
    )
    assert hpa.spec.scale_target_ref.name == "hpa-write-api"
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 6)
    assert hpa.metadata.owner_references[0].kind == "CqrsStack"
    assert await replicas(kube_api, namespace, "hpa-write-api") == 2  # created at the minimum

    # The HPA scales write-api to 5 through the scale subresource, as its controller does;
    # read-api (no HPA) is scaled by hand, which the operator repairs.
    apps = client.AppsV1Api(kube_api)
    for name in ("hpa-write-api", "hpa-read-api"):
        await apps.patch_namespaced_deployment_scale(
            name, namespace, {"spec": {"replicas": 5}}, field_manager="horizontal-pod-autoscaler"
        )
    await reconciled_after_a_change(stacks, "hpa", operator)
    await reconciled_after_a_change(stacks, "hpa", operator)  # and once more, as every interval
    assert await replicas(kube_api, namespace, "hpa-write-api") == 5
    assert await replicas(kube_api, namespace, "hpa-read-api") == 2

    # Autoscaling off: the HPA goes and the spec's count is applied again.
    await stacks.patch("hpa", {"spec": {"writeApi": {"autoscaling": {"enabled": False}}}})
    await stacks.wait_ready("hpa", operator)

    async def hpa_gone() -> bool:
        try:
            await client.AutoscalingV2Api(kube_api).read_namespaced_horizontal_pod_autoscaler(
                "hpa-write-api", namespace
            )
        except ApiException as exc:
            return exc.status == 404
        return False

    await wait_until(hpa_gone, timeout=30, what="the HPA deleted", alive=operator.exit_reason)
    assert await replicas(kube_api, namespace, "hpa-write-api") == 2


POD_CONTROLS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"pool": "cqrs"},
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"team": "orders"}},
                    },
                }
            ]
        }
    },
    "tolerations": [{"key": "dedicated", "value": "cqrs", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"example.com/scrape": "true"},
    "podLabels": {"team": "orders"},
    "envFrom": [{"configMapRef": {"name": "extra-env"}}, {"secretRef": {"name": "extra-secret"}}],
}


async def test_pod_controls_reach_the_applied_deployments(
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
    await core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "extra-env"}, "data": {"FEATURE": "on"}}
    )
    await core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "extra-secret", "labels": {"cqrs.dev/stack-secret": "true"}},
            "stringData": {"API_KEY": "k"},
        },
    )
    manifest = stack_manifest("pods", fresh_names, write_pg, read_pg, redis_server.url)
    for component in ("writeApi", "readApi", "projector"):
        manifest["spec"][component].update(POD_CONTROLS)
    await stacks.create(manifest)
    await stacks.wait_ready("pods", operator)
    apps = client.AppsV1Api(kube_api)
    for component in ("write-api", "read-api", "projector"):
        dep = await apps.read_namespaced_deployment(f"pods-{component}", namespace)
        pod = dep.spec.template
        assert [s.name for s in pod.spec.image_pull_secrets] == ["regcred"]
        assert pod.spec.node_selector == {"pool": "cqrs"}
        assert pod.spec.affinity.pod_anti_affinity is not None
        assert [(t.key, t.value, t.effect) for t in pod.spec.tolerations] == [
            ("dedicated", "cqrs", "NoSchedule")
        ]
        (spread,) = pod.spec.topology_spread_constraints  # the default: over nodes
        assert spread.topology_key == "kubernetes.io/hostname"
        assert spread.label_selector.match_labels == dep.spec.selector.match_labels
        assert pod.spec.priority_class_name == "system-cluster-critical"
        assert pod.metadata.annotations["example.com/scrape"] == "true"
        assert pod.metadata.labels["team"] == "orders"
        sources = [
            (
                e.config_map_ref.name if e.config_map_ref else None,
                e.secret_ref.name if e.secret_ref else None,
            )
            for e in pod.spec.containers[0].env_from
        ]
        assert sources == [("extra-env", None), (None, "extra-secret"), ("pods-config", None)]


async def test_an_env_secret_that_did_not_opt_in_is_not_handed_to_the_pods(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """envFrom of the admin Secret would put its password into a tenant's pods."""
    manifest = stack_manifest("envthief", fresh_names, write_pg, read_pg, redis_server.url)
    manifest["spec"]["projector"]["envFrom"] = [{"secretRef": {"name": "pg-write-admin"}}]
    await stacks.create(manifest)
    obj = await stacks.wait_condition(
        "envthief", "WorkloadsReady", "False", "SecretNotOptedIn", operator
    )
    assert "spec.projector.envFrom[0].secretRef" in next(
        c["message"] for c in obj["status"]["conditions"] if c["type"] == "WorkloadsReady"
    )
    with pytest.raises(ApiException) as missing:
        await client.AppsV1Api(kube_api).read_namespaced_deployment("envthief-projector", namespace)
    assert missing.value.status == 404


async def test_keda_engine_without_keda_installed_is_a_clear_condition(
    kube_api: client.ApiClient,
    namespace: str,
    stacks: Stacks,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    manifest = stack_manifest("keda", fresh_names, write_pg, read_pg, redis_server.url)
    manifest["spec"]["projector"]["autoscaling"] = {"enabled": True, "engine": "keda"}
    await stacks.create(manifest)
    # The workloads are applied once the image's migration Job succeeded.
    await run_migration_job_when_created(kube_api, namespace, "keda")
    obj = await stacks.wait_condition(
        "keda", "WorkloadsReady", "False", "KedaNotInstalled", operator
    )
    message = next(
        c["message"] for c in obj["status"]["conditions"] if c["type"] == "WorkloadsReady"
    )
    assert "install KEDA" in message and "ScaledObject" in message


WINDOW = 6  # seconds; the operator under test reconciles every 2 s


async def consume(redis: Redis, stream: str) -> None:
    """Read and acknowledge every entry as a projector would (XGROUP SETID would leave
    Redis unable to tell the group's lag)."""
    batches = await redis.xreadgroup("projectors", "test", {stream: ">"}, count=1000)
    ids = [entry_id for _, entries in batches for entry_id, _ in entries]
    if ids:
        await redis.xack(stream, "projectors", *ids)


async def test_the_builtin_scaler_waits_out_a_lag_spike_then_follows_a_backlog(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """A spike seen by one reading scales nothing; a backlog held for the scale-up window
    does; once drained the count holds for the scale-down window, then drops."""
    auto = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetLag": 10,
        "scaleUpWindowSeconds": WINDOW,
        "scaleDownWindowSeconds": WINDOW,
    }
    manifest = stack_manifest(
        "spiky", fresh_names, write_pg, read_pg, redis_server.url, projector={"autoscaling": auto}
    )
    await stacks.create(manifest)
    await stacks.wait_ready("spiky", operator)

    async def samples() -> list[dict[str, Any]]:
        obj = await stacks.get("spiky")
        projector = ((obj or {}).get("status") or {}).get("projector") or {}
        return list(projector.get("recommendations") or [])

    async def baseline_read() -> bool:
        # A reading of no lag before the spike. The status keeps only the newest of equal
        # asks (scaling.compact), so a steady lag is one sample however long it lasted.
        return any(s["replicas"] == 1 for s in await samples())

    await wait_until(baseline_read, timeout=30, what="a reading of no lag", interval=0.5)
    redis = Redis.from_url(redis_server.url)
    stream = f"{namespace}.spiky-events"
    try:
        for i in range(25):  # nobody consumes: a lag of 25 asks for 3 replicas
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})

        async def spike_seen() -> float | None:
            asked = [s["time"] for s in await samples() if s["replicas"] == 3]
            return asked[0] if asked else None

        spike_at = await wait_until(spike_seen, timeout=30, what="a reading of the spike")
        await consume(redis, stream)  # the spike is gone

        async def window_passed() -> bool:
            seen = await samples()
            return seen[-1]["time"] > spike_at + WINDOW and seen[-1]["replicas"] == 1

        await wait_until(window_passed, timeout=30, what="the spike out of the window")
        assert await replicas(kube_api, namespace, "spiky-projector") == 1

        for i in range(25):  # a backlog that stays
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 26)})

        async def scaled_to(count: int) -> bool:
            return await replicas(kube_api, namespace, "spiky-projector") == count

        await wait_until(lambda: scaled_to(3), timeout=30, what="3 projectors for the backlog")
        await consume(redis, stream)
        drained_at = time.time()
        await wait_until(lambda: scaled_to(1), timeout=30, what="back to 1 after the window")
        # Held until no reading of the window asked for 3: the last one came at most one
        # interval (2 s) before the drain.
        assert time.time() - drained_at >= WINDOW - 2.5
    finally:
        await redis.aclose()

"""The operator runs with exactly the RBAC the chart ships, and that RBAC is not wider.

The chart's ServiceAccount, Role and RoleBinding are rendered with helm and applied to the
real API server; the operator then runs with that ServiceAccount's token.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.operator.fixtures_operator import (
    PERMISSION_DENIED,
    RELEASE,
    ChartRbac,
    World,
    database_exists,
    names,
    render_operator_rbac,
    role_exists,
    service_account,
)


def test_cluster_wide_rendering_binds_one_cluster_role() -> None:
    docs = render_operator_rbac("ops", "rbac.clusterWide=true", "operator.manageCrd=false")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "namespaces" not in resources and "customresourcedefinitions" not in resources
    assert not any("*" in rule["verbs"] for rule in role["rules"])
    # The only deletes: autoscalers the spec dropped, a rebuild Job it cancelled (children
    # otherwise go with their owner).
    deletable = {
        r for rule in role["rules"] if "delete" in rule["verbs"] for r in rule["resources"]
    }
    assert deletable == {
        "horizontalpodautoscalers",
        "scaledobjects",
        "triggerauthentications",
        "jobs",
    }
    verbs = {r: set(rule["verbs"]) for rule in role["rules"] for r in rule["resources"]}
    # Read by name only (kube.read_object, kube.list_pods): no list/watch of Deployments.
    assert verbs["deployments"] == {"get", "create", "patch"}
    assert verbs["pods"] == {"list"}


def test_the_operator_runs_in_its_own_namespace_and_may_finalize_stacks_anywhere() -> None:
    """Its Role goes with a deleted namespace: the stacks' rules are bound cluster-wide too."""
    docs = render_operator_rbac("ops", "operator.manageCrd=false")
    assert service_account(docs) == ("ops-operator", f"{RELEASE}-cqrs-stack-operator")
    (finalize,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert {r for rule in finalize["rules"] for r in rule["resources"]} == {
        "cqrsstacks",
        "cqrsstacks/status",
        "events",
    }
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["namespace"] == "ops-operator"
    same = render_operator_rbac("ops", "operator.namespace=ops")
    assert service_account(same) == ("ops", f"{RELEASE}-cqrs-stack-operator")


def test_leader_election_may_touch_its_one_lease_only() -> None:
    for sets in ((), ("rbac.clusterWide=true",)):
        docs = render_operator_rbac("ops", *sets)
        role = named_doc(docs, "Role", f"{RELEASE}-cqrs-stack-operator-leader-election")
        assert role["metadata"]["namespace"] == "ops-operator"
        assert role["rules"] == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [f"{RELEASE}-cqrs-stack-operator"],
                "verbs": ["get", "update"],
            },
        ]
        binding = named_doc(docs, "RoleBinding", role["metadata"]["name"])
        assert binding["subjects"][0]["namespace"] == "ops-operator"


def named_doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_watch_namespaces_get_one_role_each() -> None:
    docs = render_operator_rbac("ops", "operator.watchNamespaces={a,b}")
    roles = sorted(
        (d["kind"], d["metadata"]["namespace"])
        for d in docs
        if d["kind"] in ("Role", "RoleBinding") and "leader-election" not in d["metadata"]["name"]
    )
    assert roles == [("Role", "a"), ("Role", "b"), ("RoleBinding", "a"), ("RoleBinding", "b")]


async def test_operator_lifecycle_under_the_charts_service_account(
    world: World, chart_rbac: ChartRbac
) -> None:
    operator = world.start_operator(kubeconfig=chart_rbac.kubeconfig)
    stacks, namespace = world.stacks, world.namespace

    await stacks.create(world.manifest("scoped", deletionPolicy="Delete"))
    await stacks.wait_ready("scoped", operator)
    await stacks.patch("scoped", {"spec": {"readApi": {"replicas": 3}}})
    await stacks.wait_ready("scoped", operator)
    dep = await client.AppsV1Api(world.api).read_namespaced_deployment("scoped-read-api", namespace)
    assert dep.spec.replicas == 3

    await stacks.delete("scoped")
    await stacks.wait_gone("scoped", operator)
    assert not await database_exists(world.write_pg, f"w_{world.fresh}")
    assert not await database_exists(world.read_pg, f"r_{world.fresh}")
    assert not await role_exists(world.write_pg, names(namespace, "scoped").role)

    log = operator.log_text()
    assert not PERMISSION_DENIED.search(log), operator.log_tail()


async def test_service_account_cannot_reach_beyond_its_namespace(
    kube_api: client.ApiClient, namespace: str, chart_rbac: ChartRbac
) -> None:
    other = f"{namespace}-other"
    core_admin = client.CoreV1Api(kube_api)
    await core_admin.create_namespace({"metadata": {"name": other}})
    await core_admin.create_namespaced_secret(
        other, {"metadata": {"name": "private"}, "stringData": {"k": "v"}}
    )

    sa_api = await config.new_client_from_config(config_file=str(chart_rbac.kubeconfig))
    try:
        core, apps = client.CoreV1Api(sa_api), client.AppsV1Api(sa_api)
        # What it needs works...
        await core.read_namespaced_secret("pg-write-admin", namespace)
        # ...and nothing more.
        refused = [
            lambda: core.read_namespaced_secret("private", other),
            lambda: core.list_secret_for_all_namespaces(),
            lambda: core.list_namespaced_secret(namespace),
            lambda: core.delete_namespace(other),
            lambda: core.delete_namespaced_secret("pg-write-admin", namespace),
            lambda: apps.delete_collection_namespaced_deployment(namespace),
            lambda: core.create_namespaced_pod(
                namespace,
                {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
            ),
            lambda: client.RbacAuthorizationV1Api(sa_api).create_namespaced_role(
                namespace, {"metadata": {"name": "escalate"}, "rules": []}
            ),
            lambda: client.ApiextensionsV1Api(sa_api).list_custom_resource_definition(),
        ]
        for call in refused:
            with pytest.raises(ApiException) as denied:
                await call()
            assert denied.value.status == 403
    finally:
        await sa_api.close()

"""Smoke tests of the kube_apiserver fixture: it answers, admin works, RBAC is enforced."""

from __future__ import annotations

import uuid
from typing import Any

from tests.fixtures.control_plane import ApiResponse, ControlPlane, KubeClient, wait_for

# RBAC changes reach the authorizer through an informer: allow it a moment to catch up.
RBAC_PROPAGATION_TIMEOUT = 10.0


def _new_namespace(admin: KubeClient) -> str:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    admin.create(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    return name


def _service_account_client(plane: ControlPlane, admin: KubeClient, namespace: str) -> KubeClient:
    admin.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "probe"}},
    )
    token = plane.create_token(namespace, "probe")
    return KubeClient.from_kubeconfig(plane.kubeconfig_for_token(token))


def _status_becomes(client: KubeClient, path: str, status: int) -> ApiResponse:
    last: list[ApiResponse] = []

    def check() -> bool:
        last[:] = [client.get(path)]
        return last[0].status == status

    wait_for(check, timeout=RBAC_PROPAGATION_TIMEOUT, what=f"GET {path} -> {status}")
    return last[0]


def test_api_server_answers(kube_apiserver: ControlPlane) -> None:
    admin = kube_apiserver.admin_client()
    assert admin.get("/readyz").status == 200
    version = admin.get("/version")
    assert version.ok
    assert version.body["gitVersion"].startswith("v1.")
    assert kube_apiserver.server.startswith("https://127.0.0.1:")
    assert kube_apiserver.ca_file.is_file()


def test_admin_kubeconfig_creates_namespace(kube_apiserver: ControlPlane) -> None:
    admin = KubeClient.from_kubeconfig(kube_apiserver.kubeconfig)
    name = _new_namespace(admin)
    got = admin.get(f"/api/v1/namespaces/{name}")
    assert got.ok
    assert got.body["status"]["phase"] == "Active"


def test_token_identity_is_the_service_account(kube_apiserver: ControlPlane) -> None:
    admin = kube_apiserver.admin_client()
    namespace = _new_namespace(admin)
    client = _service_account_client(kube_apiserver, admin, namespace)
    review = client.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review.ok, review.body
    user = review.body["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{namespace}:probe"


def test_rbac_forbids_until_bound(kube_apiserver: ControlPlane) -> None:
    admin = kube_apiserver.admin_client()
    namespace = _new_namespace(admin)
    client = _service_account_client(kube_apiserver, admin, namespace)
    configmaps = f"/api/v1/namespaces/{namespace}/configmaps"

    # Authenticated (not 401) but not authorized: RBAC is on and grants nothing.
    denied = client.get("/api/v1/namespaces")
    assert denied.status == 403, denied.body
    assert client.get(configmaps).status == 403

    subject = [{"kind": "ServiceAccount", "name": "probe", "namespace": namespace}]
    rbac = "/apis/rbac.authorization.k8s.io/v1"

    # A namespaced Role opens exactly the namespaced resource.
    admin.create(
        f"{rbac}/namespaces/{namespace}/roles",
        _rbac_object("Role", "read-configmaps", ["configmaps"]),
    )
    admin.create(
        f"{rbac}/namespaces/{namespace}/rolebindings",
        _binding("RoleBinding", "read-configmaps", "Role", subject),
    )
    _status_becomes(client, configmaps, 200)
    assert client.get("/api/v1/namespaces").status == 403

    # Namespaces are cluster-scoped: listing them takes a ClusterRole binding.
    role_name = f"list-namespaces-{namespace}"
    admin.create(f"{rbac}/clusterroles", _rbac_object("ClusterRole", role_name, ["namespaces"]))
    admin.create(
        f"{rbac}/clusterrolebindings",
        _binding("ClusterRoleBinding", role_name, "ClusterRole", subject),
    )
    listed = _status_becomes(client, "/api/v1/namespaces", 200)
    assert namespace in {item["metadata"]["name"] for item in listed.body["items"]}


def test_pods_are_admitted_without_service_account_controller(
    kube_apiserver: ControlPlane,
) -> None:
    # No controller-manager creates the "default" ServiceAccount; pods must still be
    # accepted (they are stored, never run).
    admin = kube_apiserver.admin_client()
    namespace = _new_namespace(admin)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "idle"},
        "spec": {"containers": [{"name": "main", "image": "example.invalid/idle:1"}]},
    }
    created = admin.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    assert created.body["status"]["phase"] == "Pending"


def _rbac_object(kind: str, name: str, resources: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": resources, "verbs": ["get", "list"]}],
    }


def _binding(
    kind: str, name: str, role_kind: str, subjects: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": subjects,
    }

"""End to end on a real cluster: what a platform engineer does, in order.

helm install (release stack + dev PostgreSQL and Redis) -> kubectl apply of a second
CqrsStack -> writes and reads through both -> scale a projector -> delete a stack with
deletionPolicy Delete and see its databases and role gone. The tests share the session's
release and run in file order; the last one deletes the second stack.
"""

from __future__ import annotations

import httpx

from tests.e2e.cluster import Cluster, wait_until
from tests.e2e.conftest import STACK_TIMEOUT, Namespace, deployment_ready


def write_then_read(cluster: Cluster, stack: str, namespace: str, key: str, value: str) -> None:
    """POST through the write-api Service, then read it back (read-your-writes) through the
    read-api Service; both over ``kubectl port-forward`` on loopback."""
    with cluster.port_forward(f"{stack}-write-api", 80, namespace) as write_url:
        answer = httpx.post(f"{write_url}/write", json={"key": key, "value": value}, timeout=30)
    assert answer.status_code == 200, answer.text
    written = answer.json()
    assert written["success"] is True and written["key"] == key, written
    with cluster.port_forward(f"{stack}-read-api", 80, namespace) as read_url:
        params = {"position": written["position"], "timeout": 20}
        answer = httpx.get(f"{read_url}/read/{key}", params=params, timeout=40)
    assert answer.status_code == 200, answer.text
    read = answer.json()
    assert read["position_reached"] is True, read
    assert read["success"] is True and read["value"] == value, read


def read_missing(cluster: Cluster, stack: str, namespace: str, key: str) -> None:
    with cluster.port_forward(f"{stack}-read-api", 80, namespace) as read_url:
        answer = httpx.get(f"{read_url}/read/{key}", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["success"] is False, f"{stack} sees another stack's key: {answer.text}"


def test_helm_install_gives_a_ready_stack(cluster: Cluster, namespace: Namespace, release: str):
    stack = cluster.get("cqrsstack", release, namespace.name)
    assert stack is not None
    conditions = {c["type"]: c["status"] for c in stack["status"]["conditions"]}
    assert conditions["Ready"] == "True", stack["status"]


def test_second_stack_by_kubectl_apply(cluster: Cluster, namespace: Namespace, second_stack: str):
    for component in ("write-api", "read-api"):
        assert cluster.get("service", f"{second_stack}-{component}", namespace.name) is not None


def test_write_and_read_through_both_stacks(
    cluster: Cluster, namespace: Namespace, release: str, second_stack: str
):
    write_then_read(cluster, release, namespace.name, "e2e:first", "in the release stack")
    write_then_read(cluster, second_stack, namespace.name, "e2e:second", "in the second stack")
    # Separate databases and streams: neither stack sees the other's key.
    read_missing(cluster, second_stack, namespace.name, "e2e:first")
    read_missing(cluster, release, namespace.name, "e2e:second")


def test_scale_the_projector(cluster: Cluster, namespace: Namespace, second_stack: str):
    cluster.kubectl(
        "patch", "cqrsstack", second_stack, "-n", namespace.name, "--type=merge",
        "-p", '{"spec": {"projector": {"replicas": 2}}}',
    )  # fmt: skip
    projector = f"{second_stack}-projector"
    wait_until(
        f"Deployment {projector} to have 2 ready replicas",
        lambda: deployment_ready(cluster, projector, namespace.name, replicas=2),
        STACK_TIMEOUT,
        diagnose=lambda: cluster.diagnostics(namespace.name),
    )

    def reported() -> bool:
        stack = cluster.get("cqrsstack", second_stack, namespace.name) or {}
        return stack.get("status", {}).get("projector", {}).get("replicas") == 2

    wait_until("the stack's status to report 2 projector replicas", reported, 120)
    # Two replicas share the consumer group: writes still reach the read model.
    write_then_read(cluster, second_stack, namespace.name, "e2e:scaled", "after scaling")


def test_delete_stack_drops_its_databases(
    cluster: Cluster, namespace: Namespace, release: str, second_stack: str
):
    spec = cluster.get("cqrsstack", second_stack, namespace.name)
    assert spec is not None and spec["spec"]["deletionPolicy"] == "Delete"
    server = spec["spec"]["databases"]["write"]
    pg_service = server["host"].split(".")[0]
    ours = {spec["spec"]["databases"][which]["database"] for which in ("write", "read")}
    role = cluster.secret_value(f"{second_stack}-credentials", "username", namespace.name)

    def databases() -> set[str]:
        sql = "SELECT datname FROM pg_database"
        out = cluster.psql(pg_service, server["adminSecret"], sql, namespace.name)
        return set(out.split())

    def role_exists() -> bool:
        sql = f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
        out = cluster.psql(pg_service, server["adminSecret"], sql, namespace.name)
        return out.strip() == "1"

    before = databases()
    assert ours <= before, f"{ours} not among {sorted(before)}"
    assert role_exists()

    cluster.kubectl(
        "delete", "cqrsstack", second_stack, "-n", namespace.name, "--wait", "--timeout=180s",
        timeout=200,
    )  # fmt: skip
    after = databases()
    assert after == before - ours, f"before {sorted(before)}, after {sorted(after)}"
    assert not role_exists(), f"role {role} survived its stack"
    for component in ("write-api", "read-api", "projector"):
        name = f"{second_stack}-{component}"

        def gone(name: str = name) -> bool:
            return cluster.get("deployment", name, namespace.name) is None

        wait_until(f"Deployment {name} to go with its stack", gone, 120)
    # The release's stack is untouched.
    write_then_read(cluster, release, namespace.name, "e2e:after-delete", "still here")

"""End to end: operating the operator on a real cluster.

Runs after the release is installed (tests/e2e/conftest.py): ``helm test`` of the release
passes (its hook Pod writes through the write API and reads back through the read API); of
the operator's two replicas exactly one holds the Lease, and when its pod is deleted the other
takes over within the bound and reconciles: it reports a pause of the release's stack, which
is then resumed (the stack is left as it was).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.e2e.cluster import Cluster, wait_until
from tests.e2e.conftest import RELEASE, Namespace

LEASE = f"{RELEASE}-cqrs-stack-operator"
# The chart's defaults: leaseDuration 15 s, retryPeriod 2 s; a graceful stop hands over at
# the follower's next try, a crash within both. Margin for a loaded node.
FAILOVER_BOUND = 15 + 2 + 10
# operator.statusInterval (15 s) plus one reconcile: a pause or resume is seen within it.
INTERVAL_BOUND = 15 + 30


def test_helm_test_passes(cluster: Cluster, namespace: Namespace, release: str) -> None:
    done = cluster.helm(
        "test", RELEASE, "-n", namespace.name, "--logs", "--timeout", "180s",
        timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "helm test passed" in done.stdout, done.stdout
    assert "Succeeded" in done.stdout  # helm's "Phase: Succeeded" for the hook Pod


def lease_holder(cluster: Cluster, namespace: Namespace) -> str | None:
    lease = cluster.get("lease", LEASE, namespace.operator)
    holder: str | None = ((lease or {}).get("spec") or {}).get("holderIdentity") or None
    return holder


def operator_pods(cluster: Cluster, namespace: Namespace) -> list[str]:
    done = cluster.kubectl(
        "get", "pods", "-n", namespace.operator, "-o", "json",
        "-l", "app.kubernetes.io/component=operator",
    )  # fmt: skip
    pods: list[dict[str, Any]] = json.loads(done.stdout)["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def paused_condition(cluster: Cluster, namespace: Namespace, stack: str) -> str | None:
    obj = cluster.get("cqrsstack", stack, namespace.name) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == "ReconciliationPaused":
            return str(cond["status"])
    return None


def test_one_operator_leads_and_the_other_takes_over(
    cluster: Cluster, namespace: Namespace, release: str
) -> None:
    pods = operator_pods(cluster, namespace)
    assert len(pods) == 2, pods
    holder = wait_until("a Lease holder", lambda: lease_holder(cluster, namespace), 60)
    leader = holder.rsplit("_", 1)[0]  # the identity: pod name + random suffix
    (follower,) = [p for p in pods if p != leader]
    logs = cluster.kubectl("logs", "-n", namespace.operator, follower).stdout
    assert "waiting for leadership" in logs and "leadership acquired" not in logs, logs[-2000:]

    cluster.kubectl("delete", "pod", "-n", namespace.operator, leader, "--wait=false")
    started = time.monotonic()

    def new_holder() -> str | None:
        found = lease_holder(cluster, namespace)
        return found if found and found != holder else None

    taken = wait_until("another replica to hold the Lease", new_holder, FAILOVER_BOUND, 0.5)
    took = time.monotonic() - started
    assert took <= FAILOVER_BOUND, took
    assert taken.rsplit("_", 1)[0] != leader

    # The new leader reconciles: it reports a pause, then the resume.
    cluster.kubectl("annotate", "cqrs", release, "-n", namespace.name, "cqrs.dev/reconcile=paused")
    try:
        wait_until(
            "ReconciliationPaused=True from the new leader",
            lambda: paused_condition(cluster, namespace, release) == "True",
            INTERVAL_BOUND,
        )
    finally:
        cluster.kubectl("annotate", "cqrs", release, "-n", namespace.name, "cqrs.dev/reconcile-")
    wait_until(
        "ReconciliationPaused=False once resumed",
        lambda: paused_condition(cluster, namespace, release) == "False",
        INTERVAL_BOUND,
    )

"""End to end: a stack whose pods cannot run is never Ready, and says why.

Runs on the local cluster after the release is installed (tests/e2e/conftest.py). A third
stack on the release's servers names an image tag that does not exist: its databases and
stream are provisioned, but its first pod (the migration Job's, which runs before any
Deployment) never starts, so MigrationsApplied (and Ready) stay False with the kubelet's
reason, and the phase is Failed (it needs a spec change).
"""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.cluster import Cluster, wait_until
from tests.e2e.conftest import STACK_TIMEOUT, Namespace

BAD_IMAGE_STACK = "e2e-bad-image"
IMAGE_REASONS = {"ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull", "InvalidImageName"}


def conditions(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (stack.get("status") or {}).get("conditions") or []}


def test_a_stack_with_a_bad_image_tag_is_not_ready(
    cluster: Cluster, namespace: Namespace, release: str
) -> None:
    first = cluster.get("cqrsstack", release, namespace.name)
    assert first is not None
    databases = json.loads(json.dumps(first["spec"]["databases"]))
    for which in ("write", "read"):
        databases[which]["database"] = f"e2e_{namespace.suffix}_bad_{which}"
    image = {**first["spec"]["image"], "tag": "0.0.0-no-such-tag"}
    cluster.apply(
        {
            "apiVersion": "cqrs.dev/v1alpha1",
            "kind": "CqrsStack",
            "metadata": {"name": BAD_IMAGE_STACK},
            "spec": {
                "image": image,
                "writeApi": {"replicas": 1},
                "readApi": {"replicas": 1},
                "projector": {"replicas": 1},
                "databases": databases,
                "redis": first["spec"]["redis"],
                "deletionPolicy": "Delete",
            },
        },
        namespace.name,
    )
    try:

        def refused() -> dict[str, Any] | None:
            stack = cluster.get("cqrsstack", BAD_IMAGE_STACK, namespace.name) or {}
            migrations = conditions(stack).get("MigrationsApplied", {})
            return stack if migrations.get("reason") in IMAGE_REASONS else None

        wait_until(
            "MigrationsApplied=False with an image reason",
            refused,
            STACK_TIMEOUT,
            diagnose=lambda: cluster.diagnostics(namespace.name),
        )
        stack = cluster.get("cqrsstack", BAD_IMAGE_STACK, namespace.name) or {}
        conds = conditions(stack)
        assert conds["DatabasesReady"]["status"] == "True", conds
        assert conds["Ready"]["status"] == "False", conds
        assert conds["Ready"]["reason"] in IMAGE_REASONS, conds
        assert stack["status"]["phase"] == "Failed", stack["status"]
        # No pod of an image whose migrations did not run: no Deployment at all.
        for component in ("write-api", "read-api", "projector"):
            assert (
                cluster.get("deployment", f"{BAD_IMAGE_STACK}-{component}", namespace.name) is None
            )
    finally:
        cluster.kubectl(
            "delete", "cqrsstack", BAD_IMAGE_STACK, "-n", namespace.name, "--wait",
            "--timeout=180s", timeout=200,
        )  # fmt: skip

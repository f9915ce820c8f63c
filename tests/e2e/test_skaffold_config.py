"""skaffold.yaml is valid and deploys what it builds, checked with skaffold itself, offline.

``skaffold diagnose --yaml-only`` parses the config (and the kind profile) with skaffold's
own schema; ``skaffold render --offline`` runs the Helm deployer (``helm template`` of the
chart) with the image references skaffold would inject. No Docker, no cluster, no registry:
``--digest-source=tag`` and a fixed ``--tag`` make render use the tags without building.
skaffold comes from ``make dev-tools``, helm from ``make k8s-tools`` (both .cache/bin).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.cluster import CACHE_BIN, REPO_ROOT, find_tool

TAG = "render-check"


def skaffold(*args: str, home: Path, extra_env: dict[str, str] | None = None) -> str:
    binary = find_tool("skaffold")
    if binary is None or find_tool("helm") is None:
        pytest.fail("skaffold or helm is not built: run `make dev-tools k8s-tools`", pytrace=False)
    env = {
        **os.environ,
        # skaffold calls helm from PATH; its own config and caches go to a temp HOME.
        "PATH": f"{CACHE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "SKAFFOLD_UPDATE_CHECK": "false",
        "SKAFFOLD_INTERACTIVE": "false",
        # Activates the profile offline-databases: only where a test sets it.
        "CQRS_OFFLINE_DATABASES": "0",
        **(extra_env or {}),
    }
    done = subprocess.run(
        [binary, *args, "--filename", str(REPO_ROOT / "skaffold.yaml")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"skaffold {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


PROFILES = [[], ["--profile", "kind"], ["--profile", "local"]]
PROFILE_IDS = ["default", "kind", "local"]


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_diagnose_accepts_the_config(home: Path, profile: list[str]):
    config = yaml.safe_load(skaffold("diagnose", "--yaml-only", *profile, home=home))
    images = {artifact["image"] for artifact in config["build"]["artifacts"]}
    assert images == {"cqrs-stack", "cqrs-stack-operator"}
    assert config["build"]["local"]["push"] is False
    if profile:
        context = {"kind": "kind-cqrs", "local": "cqrs-local"}[profile[1]]
        assert config["deploy"]["kubeContext"] == context
        # The profiles change the context and how images get in: the Helm release is the same.
        assert config["deploy"]["helm"]["releases"][0]["chartPath"].endswith("charts/cqrs-stack")
    if profile == ["--profile", "local"]:
        # No registry, no kind: each image is imported into the local cluster's containerd.
        for artifact in config["build"]["artifacts"]:
            assert artifact["custom"]["buildCommand"] == "bash tests/images/skaffold-build.sh"


def rendered(
    home: Path, *extra: str, extra_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    out = skaffold(
        "render",
        "--offline",
        "--digest-source=tag",
        f"--tag={TAG}",
        *extra,
        home=home,
        extra_env=extra_env,
    )
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_render_injects_the_built_images(home: Path, profile: list[str]):
    objects = rendered(home, *profile)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)

    (stack,) = by_kind["CqrsStack"]
    assert stack["metadata"]["name"] == "cqrs-stack"
    assert stack["spec"]["image"]["repository"] == "cqrs-stack"
    assert stack["spec"]["image"]["tag"] == TAG

    images = [
        container["image"]
        for deployment in by_kind["Deployment"]
        for container in deployment["spec"]["template"]["spec"]["containers"]
    ]
    assert f"cqrs-stack-operator:{TAG}" in images, images
    # devDatabases.enabled: the in-cluster PostgreSQL and Redis are part of the release.
    services = {svc["metadata"]["name"] for svc in by_kind["Service"]}
    assert any("postgresql" in name for name in services), services
    assert any("redis" in name for name in services), services


def database_images(objects: list[dict[str, Any]]) -> set[str]:
    """The images of the dev databases' StatefulSets/Deployments (not our own images)."""
    return {
        container["image"]
        for obj in objects
        if obj["kind"] in ("StatefulSet", "Deployment")
        for container in obj["spec"]["template"]["spec"]["containers"]
        if not container["image"].startswith("cqrs-stack-operator:")
        and not container["image"].startswith("cqrs-stack:")
    }


@pytest.mark.parametrize("activation", ["env", "profile"])
def test_kind_offline_databases_use_the_offline_images(home: Path, activation: str):
    """On our offline kind node (``make dev`` sets CQRS_OFFLINE_DATABASES=1), the dev databases
    are the images of tests/cluster/images, as on the local cluster; without it the chart's."""
    if activation == "env":
        offline = rendered(home, "--profile", "kind", extra_env={"CQRS_OFFLINE_DATABASES": "1"})
    else:
        offline = rendered(home, "--profile", "kind,offline-databases")
    assert database_images(offline) == {"cqrs-stack-postgresql:15", "cqrs-stack-redis:7"}
    local = rendered(home, "--profile", "local")
    assert database_images(offline) == database_images(local)
    # Where pulling works (kindest/node), the chart's defaults.
    online = database_images(rendered(home, "--profile", "kind"))
    assert online and not online & {"cqrs-stack-postgresql:15", "cqrs-stack-redis:7"}, online

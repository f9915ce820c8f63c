"""The rendered Deployments are runnable: their command, args and environment (ConfigMap and
Secret resolved from the API server) start the real services against the test servers."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import client

from cqrs_stack.localservers import free_port
from tests.operator.fixtures_operator import (
    Operator,
    Stacks,
    admin_metadata,
    stack_manifest,
    wait_until,
)


async def resolved_env(api: client.ApiClient, namespace: str, container: Any) -> dict[str, str]:
    """The container's environment as the kubelet would build it."""
    core = client.CoreV1Api(api)
    env: dict[str, str] = {}
    for source in container.env_from or []:
        cm = await core.read_namespaced_config_map(source.config_map_ref.name, namespace)
        env.update(cm.data or {})
    for var in container.env or []:
        if var.value_from is None:
            env[var.name] = var.value or ""
            continue
        ref = var.value_from.secret_key_ref
        secret = await core.read_namespaced_secret(ref.name, namespace)
        env[var.name] = base64.b64decode(secret.data[ref.key]).decode()
    return env


def local_command(container: Any, port: int) -> list[str]:
    """The rendered command and args, bound to loopback on a free port instead of 0.0.0.0:8000."""
    argv = [*container.command, *container.args]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    return argv


@pytest.mark.parametrize("isolated", [False, True], ids=["shared-redis-user", "acl-user"])
async def test_rendered_workloads_serve_a_write_then_a_read(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
    tmp_path: Path,
    isolated: bool,
) -> None:
    """With ``isolated`` the services run as the stack's Redis ACL user: its commands suffice."""
    manifest = stack_manifest("runnable", fresh_names, write_pg, read_pg, redis_server.url)
    if isolated:
        await client.CoreV1Api(kube_api).create_namespaced_secret(
            namespace,
            {
                "metadata": admin_metadata("redis-admin", "127.0.0.1", "redis"),
                "stringData": {"password": ""},  # the test Redis: default user, nopass
            },
        )
        manifest["spec"]["redis"]["adminSecret"] = "redis-admin"
    await stacks.create(manifest)
    await stacks.wait_ready("runnable", operator)
    apps = client.AppsV1Api(kube_api)
    ports: dict[str, int] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for component in ("write-api", "read-api", "projector"):
            dep = await apps.read_namespaced_deployment(f"runnable-{component}", namespace)
            container = dep.spec.template.spec.containers[0]
            env = await resolved_env(kube_api, namespace, container)
            ports[component] = free_port()
            log = (tmp_path / f"{component}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    local_command(container, ports[component]),
                    env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

        async with httpx.AsyncClient(timeout=5) as http:
            for component, port in ports.items():

                async def ready(port: int = port) -> bool:
                    try:
                        return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_until(ready, timeout=30, what=f"{component} /ready")

            written = await http.post(
                f"http://127.0.0.1:{ports['write-api']}/write", json={"key": "k1", "value": "v1"}
            )
            assert written.status_code == 200, written.text

            async def projected() -> dict[str, Any] | None:
                body = (await http.get(f"http://127.0.0.1:{ports['read-api']}/read/k1")).json()
                return body if body.get("success") else None

            body = await wait_until(projected, timeout=30, what="k1 in the read model")
            assert body["value"] == "v1"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()

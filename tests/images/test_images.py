"""The images, built offline and run as the operator's pods run them (DESIGN §6, level 5).

Every container runs as uid 10001 with a read-only root filesystem, a tmpfs /tmp, no
capabilities and no-new-privileges, on the host network against the loopback PostgreSQL,
Redis and kube-apiserver of the other levels.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from cqrs_stack.localservers import PostgresServer, free_port
from tests.fixtures.stack import Stack
from tests.images.conftest import (
    IMAGE_SIZES,
    RUN_AS,
    VERSION,
    Containers,
    Docker,
    build_images,
)
from tests.operator.fixtures_operator import Stacks, stack_manifest

# Generous: it holds for both images on the Debian base; a jump says something got bundled.
MAX_IMAGE_BYTES = 400_000_000


def inspect(docker: Docker, image: str) -> dict[str, Any]:
    result = docker.run("image", "inspect", image)
    found: dict[str, Any] = json.loads(result.stdout)[0]
    return found


def test_an_unchanged_tree_is_built_again_from_cache(
    docker: Docker, images: dict[str, str]
) -> None:
    """A second `make images` of the same tree reuses every layer: the build stages are
    tagged, so the pruning after each build (prune_images) does not take the cache with
    them (it did: every build installed all dependencies again and changed both IDs)."""
    before = {kind: inspect(docker, image)["Id"] for kind, image in images.items()}
    again = build_images(docker)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {kind: inspect(docker, image)["Id"] for kind, image in images.items()} == before


@pytest.mark.parametrize("kind", ["services", "operator"])
def test_image_runs_as_10001_and_is_slim(docker: Docker, images: dict[str, str], kind: str) -> None:
    meta = inspect(docker, images[kind])
    config = meta["Config"]
    assert config["User"] == RUN_AS
    entrypoint = {"services": ["cqrs-stack"], "operator": ["cqrs-stack-operator"]}[kind]
    assert config["Entrypoint"] == entrypoint
    labels = config["Labels"] or {}
    assert labels.get("org.opencontainers.image.version") == VERSION
    assert labels.get("org.opencontainers.image.title") == entrypoint[0]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    IMAGE_SIZES[images[kind]] = meta["Size"]
    assert meta["Size"] < MAX_IMAGE_BYTES, f"{images[kind]} is {meta['Size'] / 1e6:.0f} MB"


def test_migrate_runs_once_and_again(
    images: dict[str, str],
    containers: Containers,
    write_pg: PostgresServer,
    read_pg: PostgresServer,
    redis_server: Any,
    fresh_names: str,
) -> None:
    """`cqrs-stack migrate` as a one-shot container creates both schemas, and is idempotent."""
    write_db, read_db = f"w_img_{fresh_names}", f"r_img_{fresh_names}"
    write_pg.create_database(write_db)
    read_pg.create_database(read_db)
    env = {
        "WRITE_DB_URL": write_pg.url(write_db),
        "READ_DB_URL": read_pg.url(read_db),
        "REDIS_URL": redis_server.url,
    }
    for attempt in ("first", "second"):
        result = containers.once(images["services"], "migrate", env=env)
        assert result.returncode == 0, f"{attempt} migrate:\n{result.stdout}\n{result.stderr}"

    async def table(url: str, name: str) -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SELECT to_regclass($1)::text", name)
        finally:
            await conn.close()

    assert asyncio.run(table(write_pg.url(write_db), "commands")) == "commands"
    assert asyncio.run(table(read_pg.url(read_db), "records")) == "records"


async def test_services_image_serves_a_write_then_a_read(
    images: dict[str, str], containers: Containers, stack: Stack
) -> None:
    """write-api, read-api and projector containers: a write comes back through the read API."""
    ports = {role: free_port() for role in ("write-api", "read-api", "projector")}
    started = {
        role: containers.start(
            images["services"], role, "--host", "127.0.0.1", "--port", str(port), env=stack.env
        )
        for role, port in ports.items()
    }
    for role, container in started.items():
        await asyncio.to_thread(container.wait_http, f"http://127.0.0.1:{ports[role]}/ready")

    write_url = f"http://127.0.0.1:{ports['write-api']}"
    read_url = f"http://127.0.0.1:{ports['read-api']}"
    async with httpx.AsyncClient(timeout=15) as client:
        written = await client.post(
            f"{write_url}/write", json={"key": "image:1", "value": "from a container"}
        )
        assert written.status_code == 200, written.text
        body = written.json()
        assert body["success"] is True and body["queued"] is False, body
        # Read-your-writes: the read API waits (bounded) until the projector applied it.
        read = await client.get(
            f"{read_url}/read/image:1", params={"position": body["position"], "timeout": 10}
        )
    assert read.status_code == 200, read.text
    answer = read.json()
    assert answer["position_reached"] is True, f"{answer}\n{containers.logs()}"
    assert answer["success"] is True and answer["value"] == "from a container", answer
    await stack.assert_converges(timeout=10)


async def test_services_image_traces_and_a_hung_collector_holds_no_write(
    images: dict[str, str], containers: Containers, stack: Stack
) -> None:
    """The services image carries the tracing extra: write-api with TRACING=true starts (the
    SDK and the OTLP exporter import), and with a collector that takes the connection and never
    answers, writes are still answered at once and a stop still ends within SHUTDOWN_TIMEOUT
    and a little (README, Tracing), the queued spans left unexported."""
    port = free_port()
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # connections complete in the backlog; what is accepted is never read
        hung.settimeout(20)
        env = {
            **stack.env,
            "TRACING": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hung.getsockname()[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s: the hang begins at once
            "SHUTDOWN_TIMEOUT": "2",
        }
        api = containers.start(
            images["services"], "write-api", "--host", "127.0.0.1", "--port", str(port), env=env
        )
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(api.wait_http, f"{url}/ready")
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            first = await client.post("/write", json={"key": "traced:0", "value": "v"})
            assert first.status_code == 200, first.text
            # The exporter has connected: its export now waits on a collector that never answers.
            exporter, _ = await asyncio.to_thread(hung.accept)
            with exporter:
                for i in range(1, 21):
                    answer = await client.post("/write", json={"key": f"traced:{i}", "value": "v"})
                    assert answer.status_code == 200 and answer.json()["success"], answer.text
                started = time.monotonic()
                containers.docker.run("stop", "--time", "30", api.name, timeout=60)
                took = time.monotonic() - started
    logs = api.logs()
    assert "tracing on service=cqrs-stack-write-api" in logs, logs
    assert took < 2 + 4, f"the stop took {took:.1f} s:\n{logs}"
    entries = await stack.redis.xrange(stack.settings.event_stream_name)
    assert len(entries) == 21 and all(b"traceparent" in fields for _, fields in entries)


def test_operator_image_help(images: dict[str, str], containers: Containers) -> None:
    result = containers.once(images["operator"], "--help")
    assert result.returncode == 0, result.stderr
    assert "cqrs-stack-operator" in result.stdout


def embedded_kubeconfig(plane: Any, folder: Path) -> Path:
    """The admin kubeconfig with its certificates inline, readable by the container's user."""
    data = {
        "certificate-authority-data": plane.ca_file,
        "client-certificate-data": plane.pki.admin_cert,
        "client-key-data": plane.pki.admin_key,
    }
    inline = {key: base64.b64encode(Path(path).read_bytes()).decode() for key, path in data.items()}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": plane.server,
                    "certificate-authority-data": inline["certificate-authority-data"],
                },
            }
        ],
        "users": [
            {
                "name": "test",
                "user": {
                    "client-certificate-data": inline["client-certificate-data"],
                    "client-key-data": inline["client-key-data"],
                },
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }
    path = folder / "kubeconfig"
    path.write_text(json.dumps(config))
    if os.geteuid() == 0:
        os.chown(path, 10001, 10001)
        path.chmod(0o400)
    else:
        path.chmod(0o444)
    return path


async def test_operator_image_reconciles_a_stack(
    images: dict[str, str],
    containers: Containers,
    kube_apiserver: Any,
    stacks: Stacks,
    namespace: str,
    write_pg: PostgresServer,
    read_pg: PostgresServer,
    redis_server: Any,
    fresh_names: str,
    tmp_path: Path,
) -> None:
    """The operator image logs in with a mounted kubeconfig, answers its liveness probe and
    brings a CqrsStack to Ready (databases, role, migrations, stream and children; no kubelet
    runs, so Ready means applied, as in tests/operator)."""
    kubeconfig = embedded_kubeconfig(kube_apiserver, tmp_path)
    port = free_port()
    operator = containers.start(
        images["operator"],
        "--namespace",
        namespace,
        "--liveness",
        f"http://127.0.0.1:{port}/healthz",
        env={"KUBECONFIG": "/etc/cqrs/kubeconfig"},
        options=(f"--volume={kubeconfig}:/etc/cqrs/kubeconfig:ro",),
    )
    await asyncio.to_thread(operator.wait_http, f"http://127.0.0.1:{port}/healthz", 90)
    await stacks.create(stack_manifest("img", fresh_names, write_pg, read_pg, redis_server.url))
    try:
        await stacks.wait_ready("img", timeout=90)
    except pytest.fail.Exception as failed:
        pytest.fail(f"{failed}\n{operator.logs()}")
    assert operator.running(), operator.logs()

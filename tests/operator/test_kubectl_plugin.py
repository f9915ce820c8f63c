"""``kubectl cqrs`` against the real API server and a stack the operator provisioned on the
test's servers: status, rebuild, dlq with the stack's own credentials, psql without the
password on its command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes_asyncio import client
from redis.asyncio import Redis
from sqlalchemy import text

from cqrs_operator.kubectl_plugin import REBUILD_ANNOTATION
from cqrs_stack import stream
from cqrs_stack.config import Settings, url_password
from cqrs_stack.db import create_engine
from cqrs_stack.events import Command, encode
from cqrs_stack.localservers import PostgresServer
from tests.operator import test_operator_tls
from tests.operator.fixtures_operator import (
    Env,
    admin_metadata,
    redis_admin_secret,
    stack_manifest,
    wait_credentials,
)

# The TLS-only PostgreSQL server and its CA, as the operator's TLS tests use them.
tls_certs = test_operator_tls.tls_certs
tls_pg = test_operator_tls.tls_pg

PLUGIN = Path(sys.executable).parent / "kubectl-cqrs"
PSQL = "/usr/lib/postgresql/15/bin/psql"


def _plugin(
    kubeconfig: Path, namespace: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PLUGIN), "--kubeconfig", str(kubeconfig), "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(kubeconfig.parent),
            "USER": "tester",
            **(env or {}),
        },
    )


@pytest.fixture
async def ready_stack(env: Env, kube_apiserver: Any) -> tuple[str, dict[str, str]]:
    """A Ready stack on the test servers, its pods on a Redis ACL user of their own, and its
    credentials (the pods' URLs): the plugin works with exactly the pods' permissions."""
    await redis_admin_secret(env.api, env.namespace)
    manifest = env.manifest("plug")
    manifest["spec"]["redis"]["adminSecret"] = "redis-admin"
    await env.stacks.create(manifest)
    await env.stacks.wait_ready("plug", env.operator)
    return "plug", await wait_credentials(env.api, env.namespace, "plug", env.operator)


async def _dead_letters(
    creds: dict[str, str], redis_url: str, stream_name: str
) -> tuple[Command, str, str]:
    """A stored command dead-lettered, and an entry that carries none: their ids."""
    settings = Settings(
        write_db_url=creds["WRITE_DB_URL"],
        read_db_url=creds["READ_DB_URL"],
        redis_url=redis_url,
        event_stream_name=stream_name,
    )
    engine = create_engine(settings.write_db_url, settings, application_name="test")
    try:
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO commands (key, value, event_type) VALUES"
                        " ('plugged', 'v1', 'RecordCreated') RETURNING id, created_at"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    command = Command(int(row[0]), "plugged", "v1", "RecordCreated", row[1])
    redis = Redis.from_url(settings.redis_url)
    ids = []
    try:
        for fields in (encode(command), {"type": "RecordCreated", "key": "junk"}):
            entry = stream.Entry("1-1", {k.encode(): v.encode() for k, v in fields.items()}, 5)
            await stream.dead_letter(redis, settings, entry, "refused", "projector-0")
            ids.append((await redis.xrevrange(settings.dead_letter_stream, count=1))[0][0])
    finally:
        await redis.aclose()
    return command, ids[0].decode(), ids[1].decode()


async def test_status_rebuild_and_dlq_of_a_real_stack(
    env: Env, kube_apiserver: Any, ready_stack: tuple[str, dict[str, str]]
) -> None:
    name, creds = ready_stack
    kubeconfig = kube_apiserver.kubeconfig
    obj = await env.stacks.get(name)
    assert obj is not None
    stream_name = _stream_of(obj)
    assert creds["REDIS_URL"] != env.redis.url  # the stack's own ACL user
    command, stored, junk = await _dead_letters(creds, env.redis.url, stream_name)

    done = _plugin(kubeconfig, env.namespace, "status", name)
    assert done.returncode == 0, done.stderr
    for condition in ("Ready", "DatabasesReady", "MigrationsApplied", "StreamReady"):
        assert f"\n{condition} " in done.stdout, done.stdout
    assert "phase Ready" in done.stdout
    for component in ("write-api", "read-api", "projector"):
        assert f"\n{component} " in done.stdout
    assert "2/2" in done.stdout and "1/1" in done.stdout  # ready/desired
    assert "dead letters:  2 (oldest" in done.stdout, done.stdout
    assert "rebuild:       none in progress" in done.stdout
    _assert_no_secret(done, creds)

    done = _plugin(kubeconfig, env.namespace, "dlq", "list", name, "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["dead_letters"]
    assert [e["id"] for e in listed] == [stored, junk]
    assert (listed[0]["key"], listed[0]["position"]) == ("plugged", command.position)
    done = _plugin(kubeconfig, env.namespace, "dlq", "retry", name, stored)
    assert done.returncode == 0 and f"{stored}: applied" in done.stdout, done.stderr
    done = _plugin(kubeconfig, env.namespace, "dlq", "retry", name, stored)
    assert done.returncode == 11 and f"no dead letter {stored}" in done.stderr
    done = _plugin(kubeconfig, env.namespace, "dlq", "drop", name, junk, "--reason", "junk")
    assert done.returncode == 0, done.stderr
    _assert_no_secret(done, creds)
    read = create_engine(creds["READ_DB_URL"], Settings(), application_name="test")
    try:
        async with read.connect() as conn:
            count = await conn.scalar(text("SELECT write_count FROM records WHERE key = 'plugged'"))
            dropped = (
                await conn.execute(
                    text("SELECT entry_id, reason, dropped_by FROM dead_letter_drops")
                )
            ).all()
    finally:
        await read.dispose()
    assert count == 1 and [tuple(r) for r in dropped] == [(junk, "junk", "tester")]

    values = []
    for _ in range(2):  # each request a new value: the operator acts on a change
        done = _plugin(kubeconfig, env.namespace, "rebuild", name)
        assert done.returncode == 0 and "rebuild requested" in done.stdout, done.stderr
        obj = await env.stacks.get(name)
        assert obj is not None
        values.append(obj["metadata"]["annotations"][REBUILD_ANNOTATION])
        assert values[-1] in done.stdout
    assert values[0] != values[1]
    done = _plugin(kubeconfig, env.namespace, "status", "nosuch")
    assert done.returncode == 20 and "no CqrsStack nosuch" in done.stderr


def _stream_of(obj: dict[str, Any]) -> str:
    from cqrs_operator.spec import parse_spec

    meta = obj["metadata"]
    spec = parse_spec(
        obj["spec"], namespace=meta["namespace"], name=meta["name"], status=obj.get("status")
    )
    return spec.stream_name


def _assert_no_secret(done: subprocess.CompletedProcess[str], creds: dict[str, str]) -> None:
    password = url_password(creds["WRITE_DB_URL"]) or creds["password"]
    assert password and password not in done.stdout + done.stderr


def _watch_argv(command: list[str], home: Path) -> tuple[int, str, str, bytes]:
    """Run ``command``; its exit code, output and the argv its process showed meanwhile.

    psql takes the plugin's place (same pid): that argv is what `ps` shows."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    argv = b""
    deadline = time.monotonic() + 20
    while b"psql" not in argv.split(b"\0")[0] and time.monotonic() < deadline:
        try:
            argv = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err, argv


async def test_psql_logs_in_as_the_stack_without_the_password_on_its_argv(
    env: Env, kube_apiserver: Any, ready_stack: tuple[str, dict[str, str]]
) -> None:
    name, creds = ready_stack
    kubeconfig = kube_apiserver.kubeconfig
    password = creds["password"]
    query = "SELECT current_user || ':' || current_database() || ':' || pg_sleep(1.5)::text"
    args = [str(PLUGIN), "--kubeconfig", str(kubeconfig), "-n", env.namespace, "psql", name]
    code, out, err, argv = await asyncio.to_thread(
        _watch_argv, [*args, "--write", "--psql", PSQL, "--", "-Atc", query], kubeconfig.parent
    )
    assert code == 0, err
    assert argv.split(b"\0")[0] == PSQL.encode(), argv
    assert password.encode() not in argv
    user = creds["username"]
    assert out.strip().startswith(f"{user}:"), out

    done = _plugin(
        kubeconfig,
        env.namespace,
        "psql",
        name,
        "--read",
        "--psql",
        PSQL,
        "--",
        "-Atc",
        "SELECT current_database()",
    )
    assert done.returncode == 0 and done.stdout.strip() == creds["READ_DB_URL"].rsplit("/", 1)[1]
    done = _plugin(kubeconfig, env.namespace, "psql", name, "--read", "--psql", "no-such-psql")
    assert done.returncode == 22 and "psql not found" in done.stderr
    assert password not in done.stdout + done.stderr


async def test_psql_ignores_a_users_libpq_service_and_options_pointing_elsewhere(
    env: Env, kube_apiserver: Any, ready_stack: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """PGSERVICE/PGSERVICEFILE (libpq prefers its service file to PGHOST...), PGHOSTADDR,
    PGOPTIONS and a PGSSLMODE of the user's own are not given to psql: it reaches the stack's
    database as the stack's role, and the stack's password goes nowhere else."""
    name, creds = ready_stack
    port = urlsplit(creds["READ_DB_URL"]).port
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[elsewhere]\nhost=127.0.0.1\nport={port}\ndbname=postgres\nuser=postgres\n"
    )
    redirect = {
        "PGSERVICEFILE": str(service),
        "PGSERVICE": "elsewhere",
        "PGHOSTADDR": "127.0.0.2",
        "PGOPTIONS": "-c search_path=elsewhere",
        "PGSSLMODE": "require",  # the test server speaks no TLS: kept, it would fail
    }
    query = (
        "SELECT current_user || ':' || current_database() || ':' || current_setting('search_path')"
    )
    done = _plugin(
        kube_apiserver.kubeconfig,
        env.namespace,
        "psql",
        name,
        "--read",
        "--psql",
        PSQL,
        "--",
        "-Atc",
        query,
        env=redirect,
    )
    assert done.returncode == 0, done.stderr
    database = creds["READ_DB_URL"].rsplit("/", 1)[1]
    user = urlsplit(creds["READ_DB_URL"]).username
    assert done.stdout.strip().split(":")[:2] == [user, database], done.stdout
    assert "elsewhere" not in done.stdout


async def test_psql_and_dlq_reach_a_tls_only_server_with_the_stacks_ca(
    env: Env, kube_apiserver: Any, tls_pg: tuple[PostgresServer, str]
) -> None:
    server, ca_pem = tls_pg
    core = client.CoreV1Api(env.api)
    await core.create_namespaced_secret(
        env.namespace,
        {
            "metadata": admin_metadata("pg-tls-admin", "127.0.0.1,localhost"),
            "stringData": {"username": "postgres", "password": server.password},
        },
    )
    await core.create_namespaced_config_map(
        env.namespace, {"metadata": {"name": "pg-ca"}, "data": {"ca.crt": ca_pem}}
    )
    manifest = stack_manifest("tls", env.fresh, server, server, env.redis.url)
    for which in ("write", "read"):
        manifest["spec"]["databases"][which]["adminSecret"] = "pg-tls-admin"
    manifest["spec"]["databases"]["tls"] = {"mode": "verify-full", "caConfigMap": {"name": "pg-ca"}}
    await env.stacks.create(manifest)
    await env.stacks.wait_ready("tls", env.operator)
    kubeconfig = kube_apiserver.kubeconfig
    # Over TLS (the server refuses clear-text logins), verified against the stack's CA: psql
    # gets the pods' sslmode and a local copy of the CA they mount.
    query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    shown = r"\! echo $PGSSLMODE $PGSSLROOTCERT"
    done = _plugin(kubeconfig, env.namespace, "psql", "tls", "--read", "--psql", PSQL, "--",
                   "-At", "-c", query, "-c", shown)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ssl, mode_and_ca = done.stdout.strip().splitlines()
    mode, ca_file = mode_and_ca.split()
    copied = await asyncio.to_thread(Path(ca_file).read_text)
    assert (ssl, mode) == ("t", "verify-full") and copied == ca_pem
    done = _plugin(kubeconfig, env.namespace, "dlq", "retry", "tls", "--all")
    assert done.returncode == 0 and "retried 0 dead letters" in done.stdout, done.stderr


async def test_status_of_a_stack_whose_spec_is_invalid_still_shows_its_state(
    env: Env, kube_apiserver: Any
) -> None:
    """The parse error is one line; the conditions and the components are still shown."""
    await env.stacks.create(env.manifest("bent", redis_url=env.redis.url + "#fragment"))
    await env.stacks.wait_condition(
        "bent", "WorkloadsReady", "False", "InvalidSpec", env.operator, timeout=20
    )
    done = _plugin(kube_apiserver.kubeconfig, env.namespace, "status", "bent")
    assert done.returncode == 0, done.stderr
    assert "invalid spec:" in done.stdout and "spec.redis.url" in done.stdout, done.stdout
    assert "\nWorkloadsReady " in done.stdout and "InvalidSpec" in done.stdout
    assert "\nread-api " in done.stdout and "not created" in done.stdout


async def test_status_without_rbac_on_secrets_shows_all_but_the_dead_letters(
    env: Env, kube_apiserver: Any, ready_stack: tuple[str, dict[str, str]]
) -> None:
    """A user who may not read Secrets gets the screen; the dead-letter line names the
    refused Secret instead of the whole command failing on a 403."""
    name, creds = ready_stack
    account = "no-secrets"
    await client.CoreV1Api(env.api).create_namespaced_service_account(
        env.namespace, {"metadata": {"name": account}}
    )
    rbac = client.RbacAuthorizationV1Api(env.api)
    rules = [
        {"apiGroups": ["cqrs.dev"], "resources": ["cqrsstacks"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    ]
    await rbac.create_namespaced_role(
        env.namespace, {"metadata": {"name": account}, "rules": rules}
    )
    await rbac.create_namespaced_role_binding(
        env.namespace,
        {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": env.namespace}],
        },
    )
    kubeconfig = kube_apiserver.kubeconfig_for_token(
        kube_apiserver.create_token(env.namespace, account)
    )
    done = _plugin(kubeconfig, env.namespace, "status", name)
    assert done.returncode == 0, done.stderr
    assert "phase Ready" in done.stdout and "\nread-api " in done.stdout, done.stdout
    assert f"Secret {name}-credentials" in done.stdout and "403" in done.stdout, done.stdout
    assert "dead letters:  not shown" in done.stdout
    _assert_no_secret(done, creds)

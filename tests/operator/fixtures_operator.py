"""Fixtures and helpers for the operator tests: the CRD, a namespace, the operator process.

The operator runs as a real subprocess (``cqrs-stack-operator``) against the fixture API
server; the tests read and write objects through kubernetes_asyncio with the admin identity.
There is no kubelet nor Deployment controller: ``Stacks.wait_ready`` plays the controller by
writing each Deployment's status as available (``mark_available``), which is what Ready waits
for; tests that must see a stack not Ready simply do not.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator.spec import GROUP, PLURAL, VERSION, DefaultNames, default_names
from tests.fixtures.helm import helm_binary
from tests.operator.kubelet_standin import run_migration_jobs

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "charts" / "cqrs-stack" / "crds" / "cqrsstacks.cqrs.dev.yaml"
OPERATOR_BIN = Path(sys.executable).parent / "cqrs-stack-operator"
ADMIN_SECRETS = ("pg-write-admin", "pg-read-admin")
ADMIN_LABELS = {"cqrs.dev/admin-credentials": "true"}
ADMIN_HOSTS = "cqrs.dev/admin-hosts"
READY_TIMEOUT = 60.0
COMPONENTS = ("write-api", "read-api", "projector")
CHART = ROOT / "charts" / "cqrs-stack"
RELEASE = "cqrs-rbac"  # the release the chart's operator RBAC is rendered as
# A refused API call shows up in kopf's log as "Forbidden" or as an HTTP 403 status
# code. A bare "403" is not enough: log timestamps carry milliseconds such as ",403".
PERMISSION_DENIED = re.compile(r"Forbidden|\b(?:code|status)\W{0,4}403\b|\b403 Forbidden")


def names(namespace: str, stack: str) -> DefaultNames:
    """The default role, database and stream names of stack ``namespace/stack``."""
    return default_names(namespace, stack)


async def wait_until(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    alive: Callable[[], str | None] | None = None,
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        if alive is not None and (reason := alive()) is not None:
            pytest.fail(f"while waiting for {what}: {reason}")
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


# ------------------------------------------------------------------- API access


@pytest_asyncio.fixture(scope="session")
async def kube_api(kube_apiserver: Any) -> AsyncIterator[client.ApiClient]:
    """An admin API client; the CqrsStack CRD (from the chart) is installed and established."""
    api = await config.new_client_from_config(config_file=str(kube_apiserver.kubeconfig))
    crd = yaml.safe_load(CRD_FILE.read_text())
    ext = client.ApiextensionsV1Api(api)
    try:
        await ext.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise

    async def established() -> bool:
        live = await ext.read_custom_resource_definition(crd["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in (live.status.conditions or [])
        )

    await wait_until(established, timeout=30, what="CRD established")
    yield api
    await api.close()


def dns_name(fresh: str) -> str:
    return fresh.replace("_", "-").lower()


@pytest_asyncio.fixture
async def namespace(
    kube_api: client.ApiClient, fresh_names: str, write_pg: Any, read_pg: Any
) -> str:
    """A fresh namespace holding the admin Secrets of both PostgreSQL servers."""
    name = f"op-{dns_name(fresh_names)}"
    core = client.CoreV1Api(kube_api)
    await core.create_namespace({"metadata": {"name": name}})
    for secret, server in zip(ADMIN_SECRETS, (write_pg, read_pg), strict=True):
        await core.create_namespaced_secret(
            name,
            {
                "metadata": admin_metadata(secret, "127.0.0.1"),
                "stringData": {"username": "postgres", "password": server.password},
            },
        )
    return name


def admin_metadata(name: str, hosts: str, kind: str | None = None) -> dict[str, Any]:
    """The metadata of an admin Secret: labelled (``kind``: cqrs.dev/admin-for) and limited
    to ``hosts`` (the cqrs.dev/admin-hosts annotation, required)."""
    labels = {**ADMIN_LABELS, **({"cqrs.dev/admin-for": kind} if kind else {})}
    return {"name": name, "labels": labels, "annotations": {ADMIN_HOSTS: hosts}}


def stack_manifest(
    name: str, fresh: str, write_pg: Any, read_pg: Any, redis_url: str, **spec: Any
) -> dict[str, Any]:
    """A CqrsStack on the test servers, with databases named after ``fresh``."""
    body: dict[str, Any] = {
        "image": {"repository": "cqrs-stack", "tag": "0.1.0"},
        "writeApi": {"replicas": 2},
        "readApi": {"replicas": 2},
        "projector": {"replicas": 1, "batchSize": 500},
        "databases": {
            "write": {
                "host": "127.0.0.1",
                "port": write_pg.port,
                "adminSecret": ADMIN_SECRETS[0],
                "database": f"w_{fresh}",
            },
            "read": {
                "host": "127.0.0.1",
                "port": read_pg.port,
                "adminSecret": ADMIN_SECRETS[1],
                "database": f"r_{fresh}",
            },
        },
        "redis": {"url": redis_url},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CqrsStack",
        "metadata": {"name": name},
        "spec": body,
    }


class Stacks:
    """CqrsStack access in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, manifest
        )
        return result

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )
        return result

    async def delete(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    async def mark_available(self, name: str) -> None:
        """Play the Deployment controller: every Deployment of the stack reports its wanted
        replicas updated, ready and available for its current generation."""
        apps = client.AppsV1Api(self.api)
        for component in COMPONENTS:
            try:
                dep = await apps.read_namespaced_deployment(f"{name}-{component}", self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            wanted = dep.spec.replicas or 0
            await apps.patch_namespaced_deployment_status(
                f"{name}-{component}",
                self.namespace,
                {
                    "status": {
                        "observedGeneration": dep.metadata.generation,
                        "replicas": wanted,
                        "updatedReplicas": wanted,
                        "readyReplicas": wanted,
                        "availableReplicas": wanted,
                    }
                },
            )

    async def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        obj = await self.get(name)
        return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}

    async def wait_condition(
        self,
        name: str,
        kind: str,
        status: str,
        reason: str | None = None,
        operator: Operator | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> dict[str, Any]:
        """Wait until condition ``kind`` has ``status`` (and ``reason``); return the object."""

        async def reached() -> dict[str, Any] | None:
            obj = await self.get(name)
            conds = {
                c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []
            }
            cond = conds.get(kind, {})
            if cond.get("status") == status and (reason is None or cond.get("reason") == reason):
                return obj
            return None

        alive = operator.exit_reason if operator else None
        what = f"CqrsStack {name} {kind}={status}" + (f" ({reason})" if reason else "")
        result: dict[str, Any] = await wait_until(reached, timeout=timeout, what=what, alive=alive)
        return result

    async def wait_ready(
        self,
        name: str,
        operator: Operator | None = None,
        timeout: float = READY_TIMEOUT,
        available: bool = True,
    ) -> dict[str, Any]:
        """Wait until Ready is True for the current generation; return the object.

        With ``available`` (the default) the migration Jobs are run (kubelet_standin) and the
        Deployments marked available on the way.
        """

        async def ready() -> dict[str, Any] | None:
            if available:
                await run_migration_jobs(self.api, self.namespace, name)
                await self.mark_available(name)
            obj = await self.get(name)
            if obj is None:
                return None
            st = obj.get("status") or {}
            conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
            fresh = st.get("observedGeneration") == obj["metadata"]["generation"]
            return obj if fresh and conds.get("Ready") == "True" else None

        alive = operator.exit_reason if operator else None
        result: dict[str, Any] = await wait_until(
            ready, timeout=timeout, what=f"CqrsStack {name} Ready", alive=alive, interval=0.5
        )
        return result

    async def wait_gone(
        self, name: str, operator: Operator | None = None, timeout: float = READY_TIMEOUT
    ) -> None:
        async def gone() -> bool:
            return await self.get(name) is None

        alive = operator.exit_reason if operator else None
        await wait_until(gone, timeout=timeout, what=f"CqrsStack {name} deleted", alive=alive)


@pytest.fixture
def stacks(kube_api: client.ApiClient, namespace: str) -> Stacks:
    return Stacks(kube_api, namespace)


# ------------------------------------------------------------------- the operator


class Operator:
    """``cqrs-stack-operator`` as a subprocess; its log goes to a file."""

    def __init__(
        self, kubeconfig: Path, namespace: str, log: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log = log
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "CQRS_OPERATOR_STATUS_INTERVAL": "2",
            "CQRS_OPERATOR_RETRY_DELAY": "1",
            "CQRS_OPERATOR_DELETE_TIMEOUT": "10",
            # ProjectionStalled/ProjectionDegraded within seconds.
            "PROJECTOR_STOPPED_AFTER": "1",
            "PROJECTION_LAG_TARGET": "1",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(OPERATOR_BIN), "--namespace", self.namespace, *self.extra_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def exit_reason(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"operator exited with {self.process.returncode}; log:\n{self.log_tail()}"
        return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or an OOM kill would leave it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def operator_factory(tmp_path: Path) -> Iterator[Callable[..., Operator]]:
    """Start operators for a test; all are stopped when it ends."""
    started: list[Operator] = []

    def start(kubeconfig: Path, namespace: str, *extra_args: str) -> Operator:
        log = tmp_path / f"operator-{len(started)}.log"
        op = Operator(kubeconfig, namespace, log, tuple(extra_args)).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


@pytest.fixture
def operator(
    operator_factory: Callable[..., Operator], kube_apiserver: Any, namespace: str
) -> Operator:
    """The operator, as admin, watching the test's namespace."""
    return operator_factory(kube_apiserver.kubeconfig, namespace)


# ------------------------------------------------------------------- servers


async def database_exists(server: Any, name: str) -> bool:
    conn = await asyncpg.connect(server.url())
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def role_exists(server: Any, name: str) -> bool:
    conn = await asyncpg.connect(server.url())
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name))
    finally:
        await conn.close()


# ------------------------------------------------------------------- Secrets, Events, children


async def secret_data(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    """The decoded data of Secret ``namespace/name``."""
    secret = await client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


async def wait_credentials(
    api: client.ApiClient, namespace: str, stack: str, operator: Operator
) -> dict[str, str]:
    """Wait until the stack's credentials Secret exists with the pods' URLs; its data. (A new
    password is stored alone first; the URLs follow once the servers accept it.)"""

    async def recreated() -> dict[str, str] | None:
        try:
            data = await secret_data(api, namespace, f"{stack}-credentials")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return data if "WRITE_DB_URL" in data else None

    result: dict[str, str] = await wait_until(
        recreated, timeout=30, what="credentials Secret with URLs", alive=operator.exit_reason
    )
    return result


async def create_secret(
    api: client.ApiClient, namespace: str, metadata: dict[str, Any], data: dict[str, str]
) -> None:
    """As the tenant may: create (never read) a Secret."""
    await client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": metadata, "stringData": data}
    )


async def redis_admin_secret(api: client.ApiClient, namespace: str) -> None:
    """Secret ``redis-admin``: the test Redis's admin login (default user, no password) for
    127.0.0.1, so that stacks naming it get their own ACL user."""
    await create_secret(
        api, namespace, admin_metadata("redis-admin", "127.0.0.1", "redis"), {"password": ""}
    )


async def allow_adoption(api: client.ApiClient, namespace: str) -> None:
    """The platform's consent: the admin Secrets allow stacks to adopt unmarked objects."""
    for secret in ADMIN_SECRETS:
        await client.CoreV1Api(api).patch_namespaced_secret(
            secret, namespace, {"metadata": {"annotations": {"cqrs.dev/allow-adopt": "true"}}}
        )


async def events(api: client.ApiClient, namespace: str, name: str) -> list[Any]:
    """The Events about object ``name``."""
    listed = await client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(listed.items)


async def wait_event(
    api: client.ApiClient, namespace: str, name: str, reason: str, operator: Operator
) -> Any:
    """Wait for an Event with ``reason`` about ``name``; return it."""

    async def found() -> Any:
        return next((e for e in await events(api, namespace, name) if e.reason == reason), None)

    return await wait_until(
        found, timeout=30, what=f"Event {reason} on {name}", alive=operator.exit_reason
    )


async def config_hashes(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    """The config hash of each of the stack's Deployments (each hashes what it reads)."""
    apps = client.AppsV1Api(api)
    out = {}
    for component in COMPONENTS:
        dep = await apps.read_namespaced_deployment(f"{name}-{component}", namespace)
        out[component] = dep.spec.template.metadata.annotations["cqrs.dev/config-hash"]
    return out


# ------------------------------------------------------------------- one test's world


@dataclass(frozen=True)
class World:
    """What an operator test starts from, before any operator runs: the admin API and the API
    server, a namespace with the admin Secrets, its stacks, both PostgreSQL servers, Redis,
    fresh names, and the factory of operators (all stopped when the test ends)."""

    api: client.ApiClient
    namespace: str
    stacks: Stacks
    write_pg: Any
    read_pg: Any
    redis: Any
    fresh: str
    apiserver: Any
    operator_factory: Callable[..., Operator]

    def manifest(
        self, name: str, fresh: str | None = None, redis_url: str | None = None, **spec: Any
    ) -> dict[str, Any]:
        """A CqrsStack on the test servers (databases named after ``fresh``)."""
        return stack_manifest(
            name,
            self.fresh if fresh is None else fresh,
            self.write_pg,
            self.read_pg,
            self.redis.url if redis_url is None else redis_url,
            **spec,
        )

    def start_operator(self, *args: str, kubeconfig: Path | None = None) -> Operator:
        """An operator watching the test's namespace, as admin unless ``kubeconfig``."""
        return self.operator_factory(kubeconfig or self.apiserver.kubeconfig, self.namespace, *args)

    def running(self, operator: Operator) -> Env:
        """This world with ``operator`` running in it."""
        return Env(**{f.name: getattr(self, f.name) for f in fields(World)}, operator=operator)


@dataclass(frozen=True)
class Env(World):
    """What most operator tests need: the world and the operator watching its namespace."""

    operator: Operator


@pytest.fixture
def world(
    kube_api: client.ApiClient,
    kube_apiserver: Any,
    namespace: str,
    stacks: Stacks,
    operator_factory: Callable[..., Operator],
    write_pg: Any,
    read_pg: Any,
    redis_server: Any,
    fresh_names: str,
) -> World:
    return World(
        kube_api,
        namespace,
        stacks,
        write_pg,
        read_pg,
        redis_server,
        fresh_names,
        kube_apiserver,
        operator_factory,
    )


@pytest.fixture
def env(world: World, operator: Operator) -> Env:
    return world.running(operator)


# ------------------------------------------------------------------- the chart's RBAC


def render_operator_rbac(namespace: str, *values: str) -> list[dict[str, Any]]:
    """``helm template`` of the operator's ServiceAccount and RBAC, as the chart ships them
    (the CRD's ClusterRole of operator-crd.yaml included, its ConfigMap left out)."""
    args = [
        str(helm_binary()),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        "--show-only",
        "templates/operator-rbac.yaml",
    ]
    if "operator.manageCrd=false" not in values:  # else it renders nothing (helm refuses)
        args += ["--show-only", "templates/operator-crd.yaml"]
    for value in values:
        args += ["--set", value]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc and doc["kind"] != "ConfigMap"]


async def apply_rendered(api: client.ApiClient, docs: list[dict[str, Any]]) -> None:
    """Create the rendered objects, and the operator's own namespace they name first."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for ns in {d["metadata"].get("namespace") for d in docs} - {None}:
        try:
            await core.create_namespace({"metadata": {"name": ns}})
        except ApiException as exc:
            if exc.status != 409:
                raise
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        create = {
            "ServiceAccount": lambda d, ns=ns: core.create_namespaced_service_account(ns, d),
            "Role": lambda d, ns=ns: rbac.create_namespaced_role(ns, d),
            "RoleBinding": lambda d, ns=ns: rbac.create_namespaced_role_binding(ns, d),
            "ClusterRole": rbac.create_cluster_role,
            "ClusterRoleBinding": rbac.create_cluster_role_binding,
        }[doc["kind"]]
        await create(doc)


def service_account(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the operator's ServiceAccount."""
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    return account["metadata"]["namespace"], account["metadata"]["name"]


@dataclass(frozen=True)
class ChartRbac:
    """The chart's operator RBAC, applied for the test's namespace: the rendered objects, the
    ServiceAccount (``namespace``, ``account``) and a kubeconfig with its token."""

    docs: list[dict[str, Any]]
    namespace: str
    account: str
    kubeconfig: Path


@pytest_asyncio.fixture
async def chart_rbac(kube_api: client.ApiClient, kube_apiserver: Any, namespace: str) -> ChartRbac:
    docs = render_operator_rbac(namespace)
    await apply_rendered(kube_api, docs)
    op_namespace, account = service_account(docs)
    token = kube_apiserver.create_token(op_namespace, account)
    return ChartRbac(docs, op_namespace, account, kube_apiserver.kubeconfig_for_token(token))

"""The imperative shell: make the world match one stack's spec, step by step.

Order matters for restart safety: the generated password is stored in the stack's Secret
before any role uses it, so a reconcile killed anywhere finds it again on the next run.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import kube, manifests, provisioning, status
from .provisioning import AdminLogin, ProvisioningError
from .spec import Database, StackSpec

log = logging.getLogger(__name__)

Adopt = Callable[[dict[str, Any]], None]


@dataclass
class Outcome:
    """What a reconcile found: the conditions to report and, on failure, the error."""

    conditions: list[status.Condition] = field(default_factory=list)
    error: ProvisioningError | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def admin_login(api: client.ApiClient, spec: StackSpec, db: Database) -> AdminLogin:
    data = await _secret(api, spec.namespace, db.admin_secret)
    if "username" not in data or "password" not in data:
        raise ProvisioningError(
            "AdminSecretInvalid",
            f"Secret {spec.namespace}/{db.admin_secret} needs keys username and password",
        )
    return AdminLogin(data["username"], data["password"])


async def redis_url(api: client.ApiClient, spec: StackSpec) -> str:
    if spec.redis_url:
        return spec.redis_url
    ref = spec.redis_url_secret
    assert ref is not None  # parse_spec guarantees one of url / urlSecret
    data = await _secret(api, spec.namespace, ref.name)
    if ref.key not in data:
        raise ProvisioningError(
            "RedisSecretInvalid", f"Secret {spec.namespace}/{ref.name} has no key {ref.key!r}"
        )
    return data[ref.key]


async def _maybe_secret(api: client.ApiClient, namespace: str, name: str) -> dict[str, str] | None:
    try:
        return await kube.read_secret(api, namespace, name)
    except ApiException as exc:
        raise ProvisioningError(
            "SecretUnreadable", f"cannot read Secret {namespace}/{name}: HTTP {exc.status}"
        ) from exc


async def _secret(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    data = await _maybe_secret(api, namespace, name)
    if data is None:
        raise ProvisioningError("SecretNotFound", f"Secret {namespace}/{name} does not exist")
    return data


async def stack_password(api: client.ApiClient, spec: StackSpec) -> str:
    """The role's password kept in ``<stack>-credentials``, or a new one if there is none."""
    name = manifests.child_name(spec, "credentials")
    existing = await _maybe_secret(api, spec.namespace, name)
    password = (existing or {}).get("password", "")
    try:
        provisioning.quote_password(password)
        return password
    except ValueError:
        return secrets.token_urlsafe(32)


async def _apply(api: client.ApiClient, manifest: dict[str, Any], adopt: Adopt) -> dict[str, Any]:
    adopt(manifest)
    try:
        return await kube.apply(api, manifest)
    except ApiException as exc:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        raise ProvisioningError(
            "ApplyFailed", f"applying {kind} {name} failed: HTTP {exc.status} {exc.reason}"
        ) from exc


async def provision(api: client.ApiClient, spec: StackSpec, adopt: Adopt) -> tuple[str, str]:
    """Credentials Secret, role, databases, migrations. Returns (password, redis URL)."""
    password = await stack_password(api, spec)
    url = await redis_url(api, spec)
    await _apply(api, manifests.credentials_secret(spec, password, url), adopt)
    for db, kind in ((spec.write_db, "write"), (spec.read_db, "read")):
        login = await admin_login(api, spec, db)
        await provisioning.ensure_database(db, login, spec.role, password)
        version = await provisioning.migrate_database(db, spec.role, password, kind)
        log.info(
            "database ready stack=%s/%s database=%s schema_version=%d",
            spec.namespace,
            spec.name,
            db.name,
            version,
        )
    return password, url


async def apply_workloads(
    api: client.ApiClient,
    spec: StackSpec,
    password: str,
    url: str,
    projector_count: int,
    adopt: Adopt,
) -> list[dict[str, Any]]:
    """Apply the ConfigMap, Deployments and Services; return the live objects."""
    config = manifests.config_data(spec)
    digest = manifests.config_hash(config, manifests.credentials_data(spec, password, url))
    live = [await _apply(api, manifests.config_map(spec), adopt)]
    for manifest in manifests.workloads(spec, digest, projector_count):
        live.append(await _apply(api, manifest, adopt))
    return live


def current_projector_replicas(current_status: Mapping[str, Any]) -> int | None:
    value = (current_status.get("projector") or {}).get("replicas")
    return value if isinstance(value, int) else None


async def reconcile(
    api: client.ApiClient, spec: StackSpec, current_status: Mapping[str, Any], adopt: Adopt
) -> Outcome:
    """Run every step; stop at the first failure and report it in the matching condition."""
    out = Outcome()
    step = status.DATABASES
    try:
        password, url = await provision(api, spec, adopt)
        out.conditions.append(
            status.Condition(
                status.DATABASES,
                True,
                "Migrated",
                f"databases {spec.write_db.name} and {spec.read_db.name} owned by {spec.role}",
            )
        )
        out.extra["databases"] = {
            "write": spec.write_db.name,
            "read": spec.read_db.name,
            "role": spec.role,
        }
        step = status.STREAM
        await provisioning.ensure_stream(url, spec.stream_name, spec.consumer_group)
        out.conditions.append(
            status.Condition(
                status.STREAM,
                True,
                "GroupExists",
                f"stream {spec.stream_name} with consumer group {spec.consumer_group}",
            )
        )
        out.extra["stream"] = {"name": spec.stream_name, "consumerGroup": spec.consumer_group}
        step = status.WORKLOADS
        count = manifests.projector_replicas(spec, None, current_projector_replicas(current_status))
        await apply_workloads(api, spec, password, url, count, adopt)
        out.conditions.append(
            status.Condition(
                status.WORKLOADS,
                True,
                "Applied",
                f"image {spec.image}: write-api={spec.write_api.replicas} "
                f"read-api={spec.read_api.replicas} projector={count}",
            )
        )
        out.extra["projector"] = {"replicas": count}
    except ProvisioningError as exc:
        out.error = exc
        out.conditions.append(status.Condition(step, False, exc.reason, exc.message))
    return out


async def teardown(api: client.ApiClient, spec: StackSpec) -> None:
    """deletionPolicy Delete: drop both databases, the role, the stream and its group."""
    logins = {db.name: await admin_login(api, spec, db) for db in (spec.write_db, spec.read_db)}
    await provisioning.drop_databases([spec.write_db, spec.read_db], logins, spec.role)
    await provisioning.delete_stream(await redis_url(api, spec), spec.stream_name)

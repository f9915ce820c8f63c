"""The imperative shell: make the world match one stack's spec, every part on its own.

Each reconcile (on a change and on every interval) checks every part independently: the
credentials, each database with the stack's role, the stream and its group, the children,
and the Deployments' availability. A part that fails is reported in its own condition; the
others still run, so drift correction never waits on Redis, nor a stream on PostgreSQL.

Order matters for restart safety: the generated password is stored in the stack's Secret
before any role uses it, so a reconcile killed anywhere finds it again on the next run.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from redis.connection import parse_url

from cqrs_stack import diagnosis
from cqrs_stack.rebuild_progress import RunProgress, live_versions, read_run

from . import (
    kube,
    manifests,
    migration_job,
    provisioning,
    rebuild_job,
    rotation,
    scaling,
    status,
)
from .errors import PERMANENT_REASONS, PermanentProvisioningError, ProvisioningError
from .ownership import OwnershipRefused
from .provisioning import AdminLogin, Change, Owner
from .rotation import Credentials, Login
from .spec import CaBundle, Database, SpecError, StackSpec, check_redis_url, recorded_names

log = logging.getLogger(__name__)

# The bounds of ProjectionStalled/ProjectionDegraded: the services' PROJECTION_LAG_TARGET and
# PROJECTOR_STOPPED_AFTER (same names, bounds and defaults), from the operator's environment.
BOUNDS = diagnosis.Bounds.from_environ()

Adopt = Callable[[dict[str, Any]], None]

# The label an admin Secret must carry before the operator sends its credentials anywhere.
ADMIN_LABEL = "cqrs.dev/admin-credentials"
# Optional: the hosts (host or host:port, comma-separated) the admin Secret may be sent to.
ADMIN_HOSTS_ANNOTATION = "cqrs.dev/admin-hosts"
# Optional: the platform allows stacks to adopt unmarked objects on this server.
ALLOW_ADOPT_ANNOTATION = "cqrs.dev/allow-adopt"
# Which server an admin Secret is for: "postgresql" (the default) or "redis".
ADMIN_FOR_LABEL = "cqrs.dev/admin-for"
POSTGRESQL, REDIS = "postgresql", "redis"
# Seconds the operator waits for the read DB to tell the rebuilds' progress (then it tries again
# at the next reconcile).
READ_PROGRESS_TIMEOUT = 10.0
# The label a Secret needs before the operator hands it to a stack's pods (spec.redis.urlSecret,
# spec.writeApi.auth.tokenSecret): the pods run an image of the tenant's choosing.
STACK_SECRET_LABEL = "cqrs.dev/stack-secret"


@dataclass
class Outcome:
    """What a reconcile found: a condition per part, the changes made, the errors."""

    conditions: list[status.Condition] = field(default_factory=list)
    errors: list[ProvisioningError] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def ok(self, kind: str, reason: str, message: str) -> None:
        self.conditions.append(status.Condition(kind, True, reason, message))

    def fail(self, kind: str, exc: ProvisioningError) -> None:
        self.errors.append(exc)
        self.conditions.append(status.Condition(kind, False, exc.reason, exc.message))


async def _maybe_secret(api: client.ApiClient, namespace: str, name: str) -> kube.SecretData | None:
    try:
        return await kube.read_secret(api, namespace, name)
    except ApiException as exc:
        raise ProvisioningError(
            "SecretUnreadable", f"cannot read Secret {namespace}/{name}: HTTP {exc.status}"
        ) from exc


async def _secret(api: client.ApiClient, namespace: str, name: str) -> kube.SecretData:
    found = await _maybe_secret(api, namespace, name)
    if found is None:
        raise ProvisioningError("SecretNotFound", f"Secret {namespace}/{name} does not exist")
    return found


def _check_admin_hosts(secret: kube.SecretData, where: str, host: str, port: int) -> None:
    """The admin Secret must name the hosts its login may be sent to, and ``host`` among them.

    The host comes from the spec, which the tenant writes: without the platform's list the
    login would go to a server of the tenant's choosing, and neither SCRAM (the server picks
    the method; asyncpg follows a cleartext or MD5 request) nor TLS (the tenant picks the
    CA) keeps the password from that server.
    """
    allowed = secret.annotations.get(ADMIN_HOSTS_ANNOTATION)
    if allowed is None:
        raise PermanentProvisioningError(
            "AdminHostsRequired",
            f"Secret {where} carries no annotation {ADMIN_HOSTS_ANNOTATION}; the operator "
            "sends an admin login only to the hosts it names",
        )
    hosts = {h.strip() for h in allowed.split(",") if h.strip()}
    if host not in hosts and f"{host}:{port}" not in hosts:
        raise PermanentProvisioningError(
            "AdminHostNotAllowed",
            f"Secret {where} allows hosts {sorted(hosts)} ({ADMIN_HOSTS_ANNOTATION}), "
            f"not {host}:{port}",
        )


def _check_admin_opt_in(secret: kube.SecretData, where: str, kind: str) -> None:
    if secret.labels.get(ADMIN_LABEL) != "true":
        raise PermanentProvisioningError(
            "AdminSecretNotOptedIn",
            f'Secret {where} is not labelled {ADMIN_LABEL}: "true"; the operator uses '
            "only admin Secrets labelled so",
        )
    # A PostgreSQL login is never sent to Redis, nor a Redis one to PostgreSQL.
    if secret.labels.get(ADMIN_FOR_LABEL, POSTGRESQL) != kind:
        raise PermanentProvisioningError(
            "AdminSecretWrongKind",
            f"Secret {where} is labelled {ADMIN_FOR_LABEL}: "
            f"{secret.labels.get(ADMIN_FOR_LABEL, POSTGRESQL)!r}, not {kind!r}",
        )


def check_admin_secret(secret: kube.SecretData, where: str, db: Database) -> AdminLogin:
    """The admin login in ``secret`` if it opted in for ``db``'s host; else raise (permanent).

    Without the opt-in anyone who may create a CqrsStack could make the operator send any
    Secret of the namespace to a host of their choosing.
    """
    _check_admin_opt_in(secret, where, POSTGRESQL)
    _check_admin_hosts(secret, where, db.host, db.port)
    if "username" not in secret.data or "password" not in secret.data:
        raise PermanentProvisioningError(
            "AdminSecretInvalid", f"Secret {where} needs keys username and password"
        )
    return AdminLogin(
        secret.data["username"],
        secret.data["password"],
        may_adopt=secret.annotations.get(ALLOW_ADOPT_ANNOTATION) == "true",
    )


def check_stack_secret(secret: kube.SecretData, where: str, field_path: str) -> None:
    """A Secret handed to the pods must say so: else any Secret of the namespace (an admin
    login, another stack's credentials) could be read by an image the tenant chose."""
    if secret.labels.get(STACK_SECRET_LABEL) != "true" or secret.labels.get(ADMIN_LABEL):
        raise PermanentProvisioningError(
            "SecretNotOptedIn",
            f"{field_path} names Secret {where}, which is not labelled {STACK_SECRET_LABEL}: "
            '"true" (or is an admin Secret); the operator hands only such Secrets to pods',
        )


async def check_token_secret(api: client.ApiClient, spec: StackSpec) -> None:
    ref = spec.write_token_secret
    if ref is None:
        return
    secret = await _secret(api, spec.namespace, ref.name)
    check_stack_secret(secret, f"{spec.namespace}/{ref.name}", "spec.writeApi.auth.tokenSecret")


async def check_env_secrets(api: client.ApiClient, spec: StackSpec) -> None:
    """Every Secret a component's envFrom names must have opted in, as every Secret handed to
    the pods (an optional one may be absent)."""
    for section, pods in (
        ("writeApi", spec.write_api.pods),
        ("readApi", spec.read_api.pods),
        ("projector", spec.projector.pods),
        ("migrationJob", spec.migration_job),
    ):
        for i, source in enumerate(pods.env_from):
            ref = source.secret_ref
            if ref is None:
                continue
            found = await _maybe_secret(api, spec.namespace, ref.name)
            if found is None and ref.optional:
                continue
            if found is None:
                raise ProvisioningError(
                    "SecretNotFound", f"Secret {spec.namespace}/{ref.name} does not exist"
                )
            where = f"{spec.namespace}/{ref.name}"
            check_stack_secret(found, where, f"spec.{section}.envFrom[{i}].secretRef")


def pod_secret_refs(template: Mapping[str, Any]) -> set[str]:
    """Every Secret a pod template reads: secret and projected volumes, envFrom, env."""
    return {name for kind, name in manifests.pod_sources(template) if kind == "Secret"}


async def check_pod_secrets(
    api: client.ApiClient, spec: StackSpec, rendered: list[dict[str, Any]]
) -> None:
    """No pod is given a Secret that did not opt in, whatever part of the spec named it.

    The single gate before any pod template is applied: each spec field that reaches a pod
    (a CA, the token, envFrom) is also checked where it is used, but a field whose own check
    did not run (its part of the reconcile failed first) must not slip through here.
    """
    own = manifests.child_name(spec, "credentials")
    for manifest in rendered:
        template = (manifest.get("spec") or {}).get("template")
        if not template:
            continue
        for name in sorted(pod_secret_refs(template) - {own}):
            where = f"{spec.namespace}/{name}"
            found = await kube.read_secret(api, spec.namespace, name)
            if found is None:
                raise ProvisioningError("SecretNotFound", f"Secret {where} does not exist")
            check_stack_secret(found, where, f"{manifest['kind']} {manifest['metadata']['name']}")


async def admin_login(api: client.ApiClient, spec: StackSpec, db: Database) -> AdminLogin:
    secret = await _secret(api, spec.namespace, db.admin_secret)
    return check_admin_secret(secret, f"{spec.namespace}/{db.admin_secret}", db)


def check_redis_admin_secret(secret: kube.SecretData, where: str, url: str) -> AdminLogin:
    """The Redis admin login (``username`` optional, ``password``) of a Secret that opted in
    for Redis (label ``cqrs.dev/admin-for: redis``) and for the URL's host (admin-hosts)."""
    _check_admin_opt_in(secret, where, REDIS)
    parts = parse_url(url)
    _check_admin_hosts(secret, where, str(parts.get("host", "")), int(parts.get("port", 6379)))
    if "password" not in secret.data:
        raise PermanentProvisioningError(
            "AdminSecretInvalid", f"Secret {where} needs key password (and optionally username)"
        )
    return AdminLogin(
        secret.data.get("username") or "default",
        secret.data["password"],
        may_adopt=secret.annotations.get(ALLOW_ADOPT_ANNOTATION) == "true",
    )


def check_isolated_database(url: str) -> None:
    """An ACL user's key patterns hold in every logical database and Redis cannot limit
    SELECT by its argument: an isolated stack uses database 0 and is not granted SELECT, so
    its pods never reach a key of the same name in another logical database."""
    db = int(parse_url(url).get("db", 0) or 0)
    if db != 0:
        raise PermanentProvisioningError(
            "RedisDatabaseNotZero",
            f"spec.redis names logical database {db}; with spec.redis.adminSecret (an ACL user "
            "per stack) the stack must use database 0",
        )


@dataclass(frozen=True)
class RedisAccess:
    """How the operator and the pods reach Redis; ``admin`` is None without isolation."""

    operator_url: str
    base_url: str
    admin: AdminLogin | None
    ca_pem: str | None = None
    user: str | None = None  # the stack's ACL user (with admin)
    ca_query: str = ""  # appended to the pods' URL: where the CA is mounted

    def pods_url(self, password: str) -> str:
        """The pods' REDIS_URL: as the stack's ACL user with ``password`` when isolated."""
        url = self.base_url
        if self.user is not None:
            url = provisioning.with_credentials(url, self.user, password)
        if self.ca_query:
            url += ("&" if "?" in url else "?") + self.ca_query
        return url


async def redis_access(api: client.ApiClient, spec: StackSpec) -> RedisAccess:
    """With a Redis admin Secret the pods log in as the stack's own ACL user; with a CA the
    operator verifies a rediss:// server by it and the pods' URL names the mounted bundle."""
    url = await redis_url(api, spec)
    ca_pem = None
    if spec.redis_ca is not None:
        if not url.startswith("rediss://"):
            raise PermanentProvisioningError(
                "RedisTlsMismatch", "spec.redis names a CA but the URL is not rediss://"
            )
        ca_pem = await read_ca(api, spec, spec.redis_ca, "spec.redis")
    admin = None
    if spec.redis_admin_secret is not None:
        name = spec.redis_admin_secret
        secret = await _secret(api, spec.namespace, name)
        admin = check_redis_admin_secret(secret, f"{spec.namespace}/{name}", url)
        check_isolated_database(url)
    ca_query = ""
    if spec.redis_ca is not None:
        ca_query = f"ssl_ca_certs={manifests.REDIS_CA_DIR}/{spec.redis_ca.key}"
    return RedisAccess(
        operator_url=(
            provisioning.with_credentials(url, admin.username, admin.password) if admin else url
        ),
        base_url=url,
        admin=admin,
        ca_pem=ca_pem,
        user=spec.redis_user if admin else None,
        ca_query=ca_query,
    )


async def redis_url(api: client.ApiClient, spec: StackSpec) -> str:
    """The stack's Redis URL (from the spec or its opted-in Secret), its host checked."""
    url = await _redis_url(api, spec)
    try:
        return check_redis_url(url, "spec.redis")
    except SpecError as exc:
        raise PermanentProvisioningError("RedisUrlInvalid", str(exc)) from exc


async def _redis_url(api: client.ApiClient, spec: StackSpec) -> str:
    if spec.redis_url:
        return spec.redis_url
    ref = spec.redis_url_secret
    assert ref is not None  # parse_spec guarantees one of url / urlSecret
    secret = await _secret(api, spec.namespace, ref.name)
    check_stack_secret(secret, f"{spec.namespace}/{ref.name}", "spec.redis.urlSecret")
    data = secret.data
    if ref.key not in data:
        raise PermanentProvisioningError(
            "RedisSecretInvalid", f"Secret {spec.namespace}/{ref.name} has no key {ref.key!r}"
        )
    return data[ref.key]


async def read_credentials(api: client.ApiClient, spec: StackSpec) -> Credentials:
    """What ``<stack>-credentials`` records (its login, a rotation's state); empty if absent."""
    name = manifests.child_name(spec, "credentials")
    existing = await _maybe_secret(api, spec.namespace, name)
    if existing is not None and existing.controller_uid != spec.uid:
        raise _not_ours("Secret", name, spec)  # never read, let alone hand out, its data
    if existing is None:
        return Credentials(active=None)
    return rotation.parse(spec.role, existing.data, existing.annotations)


def plan_credentials(
    spec: StackSpec, found: Credentials, current_status: Mapping[str, Any], requested: str
) -> tuple[Credentials, list[Change]]:
    """The credentials to store before anything uses them, and why they changed.

    - A stack never provisioned gets its role and a new password.
    - A Secret deleted or emptied (after provisioning) starts a rotation: the pods still
      running hold the last login, so the new password goes to the other login slot and
      the last login is revoked only after the rollout (one rollout).
    - A new value of the annotation cqrs.dev/rotate-credentials starts a rotation.
    """
    name = manifests.child_name(spec, "credentials")
    handled = rotation.handled_token(found, current_status)
    if found.active is None and found.next is None:
        last = rotation.recorded_login(spec.role, current_status)
        fresh = Login(spec.role if last is None else "", secrets.token_urlsafe(32))
        if last is None:
            # A value the stack was created with asks for nothing: its first password is new.
            creds = Credentials(active=fresh, token=requested or handled)
            return creds, [Change("CredentialsCreated", f"stored a new password in Secret {name}")]
        nxt = replace(fresh, username=rotation.other_login(spec.role, last))
        creds = Credentials(active=None, next=nxt, retiring=last, token=requested or handled)
        return creds, [
            Change(
                "RotationStarted",
                f"Secret {name} was missing or unusable: new password for login {nxt.username}; "
                f"login {last} is revoked once every Deployment has rolled out",
            )
        ]
    if requested and requested != handled and not found.rotating and found.active is not None:
        nxt = Login(
            rotation.other_login(spec.role, found.active.username), secrets.token_urlsafe(32)
        )
        creds = replace(found, next=nxt, retiring=found.active.username, token=requested)
        return creds, [
            Change(
                "RotationStarted",
                f"rotation {requested!r}: new password for login {nxt.username}; login "
                f"{found.active.username} is revoked once every Deployment has rolled out",
            )
        ]
    return found, []


def _not_ours(kind: str, name: str, spec: StackSpec) -> PermanentProvisioningError:
    return PermanentProvisioningError(
        "ChildNotOwned",
        f"{kind} {spec.namespace}/{name} exists and is not controlled by this CqrsStack; "
        "rename the stack or remove that object",
    )


async def _apply(
    api: client.ApiClient, spec: StackSpec, manifest: dict[str, Any], adopt: Adopt
) -> dict[str, Any]:
    """Apply a child; an existing object of that name must already be this stack's: force
    would otherwise take over another application's Deployment, Secret or Service."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    try:
        existing = await kube.read_object(api, kind, spec.namespace, name)
    except ApiException as exc:
        raise ProvisioningError(
            "ChildUnreadable", f"cannot read {kind} {name}: HTTP {exc.status}"
        ) from exc
    if existing is not None and kube.controller_uid(existing) != spec.uid:
        raise _not_ours(kind, name, spec)
    adopt(manifest)
    try:
        return await kube.apply(api, manifest)
    except ApiException as exc:
        raise apply_error(kind, name, exc) from exc


def apply_error(kind: str, name: str, exc: ApiException) -> ProvisioningError:
    """The error of a refused apply, with the API server's causes (field names only for a
    Secret). A Deployment refused as invalid (422) is built from the spec as it stands: it
    cannot succeed before the spec changes, so ApplyInvalid is permanent (phase Failed)."""
    causes = kube.refusal_causes(exc, messages=kind != "Secret")
    message = f"applying {kind} {name} failed: HTTP {exc.status} {exc.reason}"
    if causes:
        message += f": {causes}"
    if exc.status == 422 and kind == "Deployment":
        return PermanentProvisioningError("ApplyInvalid", message + " (fix the stack's spec)")
    return ProvisioningError("ApplyFailed", message)


async def ensure_credentials(
    api: client.ApiClient,
    spec: StackSpec,
    adopt: Adopt,
    current_status: Mapping[str, Any],
    requested: str = "",
) -> tuple[Credentials, RedisAccess, list[Change]]:
    """A new password is stored before any role uses it (a rotation's under ``next-*``);
    the URLs built with it are added by ``apply_credentials`` only once the databases and
    stream are the stack's."""
    found = await read_credentials(api, spec)
    creds, changes = plan_credentials(spec, found, current_status, requested)
    redis = await redis_access(api, spec)
    if changes:
        url = redis.pods_url(creds.active.password) if creds.active and found.has_urls else None
        await _apply(api, spec, rotation.secret_manifest(spec, creds, url), adopt)
    return creds, redis, changes


async def apply_credentials(
    api: client.ApiClient, spec: StackSpec, creds: Credentials, redis: RedisAccess, adopt: Adopt
) -> None:
    """The credentials Secret with the URLs the pods use (and drift of it repaired)."""
    url = redis.pods_url(creds.active.password) if creds.active else None
    await _apply(api, spec, rotation.secret_manifest(spec, creds, url), adopt)


def owner_of(spec: StackSpec, current_status: Mapping[str, Any]) -> Owner:
    return Owner(
        uid=spec.uid,
        adopt=spec.adopt,
        legacy=frozenset(recorded_names(current_status).values()),
    )


async def read_ca(api: client.ApiClient, spec: StackSpec, ca: CaBundle, field_path: str) -> str:
    """The PEM bundle of ``ca``; a Secret must have opted in (it is mounted into the pods)."""
    where = f"{spec.namespace}/{ca.name}"
    if ca.kind == "Secret":
        secret = await _secret(api, spec.namespace, ca.name)
        check_stack_secret(secret, where, f"{field_path}.caSecret")
        data: dict[str, str] | None = secret.data
    else:
        try:
            data = await kube.read_config_map(api, spec.namespace, ca.name)
        except ApiException as exc:
            raise ProvisioningError(
                "ConfigMapUnreadable", f"cannot read ConfigMap {where}: HTTP {exc.status}"
            ) from exc
    if data is None or ca.key not in data:
        raise ProvisioningError("CaNotFound", f"{ca.kind} {where} has no key {ca.key!r}")
    return data[ca.key]


async def database_tls(api: client.ApiClient, spec: StackSpec) -> provisioning.Tls:
    """The TLS context of the operator's connections to the stack's PostgreSQL servers."""
    tls = spec.database_tls
    if tls is None or tls.ca is None:
        return provisioning.tls_context(tls, None)
    pem = await read_ca(api, spec, tls.ca, "spec.databases.tls")
    try:
        return provisioning.tls_context(tls, pem)
    except ssl.SSLError as exc:
        raise PermanentProvisioningError(
            "CaInvalid", f"the CA of spec.databases.tls is no PEM CA bundle: {exc}"
        ) from exc


async def provision_databases(
    api: client.ApiClient, spec: StackSpec, creds: Credentials, owner: Owner
) -> tuple[dict[str, int], list[Change]]:
    """Role and databases on both servers; returns the schema versions.

    Every login of ``creds.accepted`` logs in afterwards; outside a rotation the other
    login slot is revoked. The versions are read as the current login (as the role: see
    rotation); the migration Job of the stack's image migrates.
    """
    versions: dict[str, int] = {}
    changes: list[Change] = []
    tls = await database_tls(api, spec)
    me = creds.current
    for db, kind in ((spec.write_db, "write"), (spec.read_db, "read")):
        login = await admin_login(api, spec, db)
        on_server = replace(owner, adopt_allowed=login.may_adopt)
        changes += await provisioning.ensure_database(
            db, login, spec.role, creds.accepted, on_server, tls, exact=not creds.rotating
        )
        versions[kind] = await provisioning.read_schema_version(db, me.username, me.password, tls)
    return versions, changes


async def read_schema_versions(api: client.ApiClient, spec: StackSpec, me: Login) -> dict[str, int]:
    """Both databases' schema versions, read as ``me`` (a login of the stack's role)."""
    tls = await database_tls(api, spec)
    return {
        kind: await provisioning.read_schema_version(db, me.username, me.password, tls)
        for db, kind in ((spec.write_db, "write"), (spec.read_db, "read"))
    }


async def source_digests(
    api: client.ApiClient, spec: StackSpec, rendered: list[dict[str, Any]]
) -> dict[str, str]:
    """Per component with a Deployment in ``rendered``, the digest of the data of the other
    Secrets and ConfigMaps its pods read (components that read none are left out)."""
    components = {manifests.child_name(spec, c): c for c in manifests.COMPONENTS}
    cache: dict[tuple[str, str], str] = {}
    out: dict[str, str] = {}
    for manifest in rendered:
        component = components.get(manifest["metadata"]["name"])
        if manifest["kind"] != "Deployment" or component is None:
            continue
        read: dict[tuple[str, str], str] = {}
        for kind, name in manifests.external_sources(spec, manifest["spec"]["template"]):
            if (kind, name) not in cache:
                cache[kind, name] = await kube.data_digest(api, kind, spec.namespace, name)
            read[kind, name] = cache[kind, name]
        if read:
            out[component] = manifests.sources_digest(read)
    return out


async def apply_workloads(
    api: client.ApiClient,
    spec: StackSpec,
    password: str,
    url: str,
    projector_count: int | None,
    adopt: Adopt,
    login: str | None = None,
) -> tuple[list[dict[str, Any]], list[Change]]:
    """Apply the ConfigMap, Deployments, Services and autoscalers; return the live objects
    and rollouts."""
    config = manifests.config_data(spec)
    credentials = manifests.credentials_data(spec, password, url, login)
    rendered = manifests.workloads(
        spec, manifests.component_hashes(config, credentials), projector_count
    )
    await check_pod_secrets(api, spec, rendered)
    # The hash also covers the data of every other Secret/ConfigMap a component reads (the
    # write token, envFrom sources, CA bundles): a new token rolls the pods that read it.
    sources = await source_digests(api, spec, rendered)
    if sources:
        digests = manifests.component_hashes(config, credentials, sources)
        rendered = manifests.workloads(spec, digests, projector_count)
    live = [await _apply(api, spec, manifests.config_map(spec), adopt)]
    changes: list[Change] = []
    for manifest in rendered:
        if manifest["kind"] != "Deployment":
            live.append(await _apply(api, spec, manifest, adopt))
            continue
        name = manifest["metadata"]["name"]
        before = await _read_deployment(api, spec.namespace, name)
        if before is not None and _template_changed(before, manifest):
            changes.append(Change("RolloutStarted", f"rolling Deployment {name}"))
        live.append(await _apply_deployment(api, spec, manifest, before is None, adopt))
    live += await apply_autoscalers(api, spec, url, adopt)
    return live, changes


async def _apply_deployment(
    api: client.ApiClient, spec: StackSpec, manifest: dict[str, Any], new: bool, adopt: Adopt
) -> dict[str, Any]:
    """Apply a Deployment with its replica count owned by a field manager of its own.

    The main apply never carries ``spec.replicas``: when an autoscaler takes a component
    over, the operator stops applying its count and the count the autoscaler sets stays
    (a forced apply of the field every interval would reset it). The count is applied
    before the main apply of an existing Deployment, so that the field never loses its
    last owner (a Deployment applied by an older operator), and after creating one.
    """
    body = {**manifest, "spec": dict(manifest["spec"])}
    replicas = body["spec"].pop("replicas", None)
    name = body["metadata"]["name"]
    if replicas is not None and not new:
        await _apply_replicas(api, spec, name, replicas)
    live = await _apply(api, spec, body, adopt)
    if new:
        if replicas is None:  # an autoscaler's: start at its minimum, never applied again
            component = body["metadata"]["labels"]["app.kubernetes.io/component"]
            replicas = manifests.initial_replicas(spec, component)
        await _apply_replicas(api, spec, name, replicas)
        live["spec"]["replicas"] = replicas
    return live


async def _apply_replicas(api: client.ApiClient, spec: StackSpec, name: str, count: int) -> None:
    try:
        await kube.apply_replicas(api, spec.namespace, name, count)
    except ApiException as exc:
        raise ProvisioningError(
            "ApplyFailed", f"scaling Deployment {name} failed: HTTP {exc.status} {exc.reason}"
        ) from exc


AUTOSCALER_KINDS = (
    ("HorizontalPodAutoscaler", "write-api"),
    ("HorizontalPodAutoscaler", "read-api"),
    ("TriggerAuthentication", "projector"),
    ("ScaledObject", "projector"),
)


async def apply_autoscalers(
    api: client.ApiClient, spec: StackSpec, url: str, adopt: Adopt
) -> list[dict[str, Any]]:
    """Apply the HPAs and KEDA objects the spec asks for; delete this stack's others."""
    wanted = manifests.autoscalers(spec, url)
    keep = {(m["kind"], m["metadata"]["name"]) for m in wanted}
    for kind, component in AUTOSCALER_KINDS:
        name = manifests.child_name(spec, component)
        if (kind, name) not in keep:
            await _delete_autoscaler(api, spec, kind, name)
    live = []
    for manifest in wanted:
        try:
            live.append(await _apply(api, spec, manifest, adopt))
        except ProvisioningError as exc:
            if manifest["kind"] in kube.CUSTOM_KINDS and "HTTP 404" in exc.message:
                raise PermanentProvisioningError(
                    "KedaNotInstalled",
                    "spec.projector.autoscaling.engine is keda but the API server serves no "
                    f"{manifest['kind']} ({manifests.KEDA_API}): install KEDA, or use engine "
                    "builtin",
                ) from exc
            raise
    return live


async def _delete_autoscaler(api: client.ApiClient, spec: StackSpec, kind: str, name: str) -> None:
    """An autoscaler the spec dropped would keep scaling: this stack's own is deleted."""
    try:
        existing = await kube.read_object(api, kind, spec.namespace, name)
        if existing is not None and kube.controller_uid(existing) == spec.uid:
            await kube.delete_object(api, kind, spec.namespace, name)
    except ApiException as exc:
        raise ProvisioningError(
            "AutoscalerCleanupFailed", f"cannot remove {kind} {name}: HTTP {exc.status}"
        ) from exc


def _template_changed(live: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    def key(obj: Mapping[str, Any]) -> tuple[Any, Any]:
        template = obj["spec"]["template"]
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        image = template["spec"]["containers"][0].get("image")
        return annotations.get(manifests.CONFIG_HASH_ANNOTATION), image

    return key(live) != key(manifest)


async def _read_deployment(
    api: client.ApiClient, namespace: str, name: str
) -> dict[str, Any] | None:
    try:
        return await kube.read_deployment(api, namespace, name)
    except ApiException as exc:
        raise ProvisioningError(
            "DeploymentUnreadable", f"cannot read Deployment {name}: HTTP {exc.status}"
        ) from exc


async def check_available(api: client.ApiClient, spec: StackSpec) -> status.Condition:
    """WorkloadsAvailable from the Deployments' status; the reason from their pods."""
    waiting: list[str] = []
    problems: list[tuple[str, str]] = []
    for component in manifests.COMPONENTS:
        name = manifests.child_name(spec, component)
        deployment = await _read_deployment(api, spec.namespace, name)
        if deployment is None:
            waiting.append(f"{name}: not created yet")
            continue
        why = status.deployment_unavailable(deployment)
        if why is None:
            continue
        waiting.append(why)
        try:
            pods = await kube.list_pods(
                api, spec.namespace, manifests.selector_labels(spec, component)
            )
        except ApiException as exc:
            raise ProvisioningError(
                "PodsUnreadable", f"cannot list pods of {name}: HTTP {exc.status}"
            ) from exc
        if (problem := status.pod_problem(pods)) is not None:
            problems.append(problem)
    if not waiting:
        return status.Condition(
            status.AVAILABLE, True, "MinimumReplicasAvailable", "every Deployment is available"
        )
    if problems:
        reasons = [p[0] for p in problems]
        first = min(reasons, key=status.POD_REASONS.index)
        return status.Condition(
            status.AVAILABLE, False, first, "; ".join(p[1] for p in problems)[:1000]
        )
    return status.Condition(status.AVAILABLE, False, "RolloutInProgress", "; ".join(waiting))


def current_projector_replicas(current_status: Mapping[str, Any]) -> int | None:
    value = (current_status.get("projector") or {}).get("replicas")
    return value if isinstance(value, int) else None


def projector_scale(
    spec: StackSpec, lag: int | None, current_status: Mapping[str, Any]
) -> tuple[int | None, list[scaling.Sample]]:
    """The projector's replicas (None: KEDA owns them) and the builtin scaler's samples."""
    auto = spec.projector.autoscaling
    current = current_projector_replicas(current_status)
    if not auto.enabled:
        return spec.projector.replicas, []
    if auto.engine == "keda":
        return None, []
    samples = scaling.recorded_samples(current_status)
    return scaling.scale(auto, lag, current, samples, time.time())


def applied_replicas(spec: StackSpec, live: list[dict[str, Any]]) -> dict[str, int]:
    """Each component's replicas as the applied Deployments say (an autoscaler's too)."""
    counts = {
        o["metadata"]["name"]: (o.get("spec") or {}).get("replicas")
        for o in live
        if o.get("kind") == "Deployment"
    }
    out: dict[str, int] = {}
    for component in manifests.COMPONENTS:
        count = counts.get(manifests.child_name(spec, component))
        out[component] = count if isinstance(count, int) else 0
    return out


def describe_replicas(spec: StackSpec, counts: Mapping[str, int]) -> str:
    """``write-api=2 read-api=hpa:3 projector=keda:1``: the counts, and who owns them."""
    owners = {
        "write-api": "hpa:" if spec.write_api.hpa else "",
        "read-api": "hpa:" if spec.read_api.hpa else "",
        "projector": "keda:" if manifests.uses_keda(spec) else "",
    }
    return " ".join(f"{c}={owners[c]}{n}" for c, n in counts.items())


async def reconcile(
    api: client.ApiClient,
    spec: StackSpec,
    current_status: Mapping[str, Any],
    adopt: Adopt,
    rotate: str = "",
    rebuild: str = "",
) -> Outcome:
    """Check and repair every part of the stack; each part reports in its own condition.

    ``rotate``: the value of the stack's annotation cqrs.dev/rotate-credentials; a value
    not handled yet starts a rotation (see rotation.py). ``rebuild``: the value of
    cqrs.dev/rebuild; a value not handled yet rebuilds every read model (rebuild_job.py).
    """
    out = Outcome()
    try:
        creds, redis, changes = await ensure_credentials(api, spec, adopt, current_status, rotate)
        out.changes += changes
    except ProvisioningError as exc:
        for kind in (status.DATABASES, status.STREAM, status.WORKLOADS):
            out.fail(kind, exc)
        return out
    owner = owner_of(spec, current_status)
    if spec.reserved:
        refused = OwnershipRefused("ReservedName", spec.reserved)
        for kind in (status.DATABASES, status.STREAM):
            out.fail(kind, refused)
        await _remove_acl_user(out, redis, spec)
        health = None
    else:
        await _databases(out, api, spec, creds, owner)
        health = await _stream(out, redis, spec, creds, owner)
    lag = None if health is None else health.lag_events
    refusal = next((e for e in out.errors if isinstance(e, OwnershipRefused)), None)
    count, samples = projector_scale(spec, lag, current_status)
    if refusal is not None:
        # A database or stream of another stack: no URL to it is handed to any pod.
        out.fail(
            status.WORKLOADS,
            PermanentProvisioningError(
                refusal.reason, f"not applied while refused: {refusal.message}"
            ),
        )
    elif not _stream_provisioned(out, current_status):
        out.conditions.append(
            status.Condition(
                status.MIGRATIONS, False, "WaitingForStream", "the migration Job waits too"
            )
        )
        # The pods create the stream and group themselves at start (XGROUP ... MKSTREAM): if
        # they started first, the stream would exist without this stack's owner marker and
        # be refused as NotOwned for good. So the first Deployments wait for the stream.
        out.conditions.append(
            status.Condition(
                status.WORKLOADS,
                False,
                "WaitingForStream",
                f"the Deployments are created once stream {spec.stream_name} is provisioned",
            )
        )
    else:
        try:
            await check_token_secret(api, spec)
            await check_env_secrets(api, spec)
            creds = _switch(out, creds)
            await apply_credentials(api, spec, creds, redis, adopt)
            active = creds.active
            if active is None:  # a lost Secret's new login, not yet accepted by the servers
                raise ProvisioningError(
                    "CredentialsPending", "the new login is not yet accepted by the servers"
                )
            serving = await _migrations(out, api, spec, active, current_status, adopt)
            if serving is None:
                raise ProvisioningError(
                    "WaitingForMigrations",
                    f"the Deployments are created once the migrations of {spec.image} succeeded",
                )
            live, changes = await apply_workloads(
                api,
                serving,
                active.password,
                redis.pods_url(active.password),
                count,
                adopt,
                login=active.username,
            )
            out.changes += changes
            applied = applied_replicas(spec, live)
            creds = await _complete_rotation(out, api, spec, creds, redis, adopt)
            out.ok(
                status.WORKLOADS,
                "Applied",
                f"image {serving.image}: {describe_replicas(spec, applied)}",
            )
            lag_part = {"lag": lag} if lag is not None else {}
            out.extra["projector"] = {
                "replicas": applied["projector"],
                **lag_part,
                **({"recommendations": scaling.as_status(samples)} if samples else {}),
            }
        except ProvisioningError as exc:
            out.fail(status.WORKLOADS, exc)
        if any(c.type == status.MIGRATIONS and c.status for c in out.conditions) and creds.active:
            # The rebuild runs the spec's image, whose schema (rebuild_runs) is now current.
            await _rebuilds(_Rebuilds(out, api, spec, creds.active, current_status, adopt), rebuild)
    try:
        out.conditions.append(await check_available(api, spec))
    except ProvisioningError as exc:
        out.fail(status.AVAILABLE, exc)
    _report_rotation(out, creds)
    await _report_projection(out, api, spec, creds, health, current_status)
    return out


async def _report_projection(
    out: Outcome,
    api: client.ApiClient,
    spec: StackSpec,
    creds: Credentials,
    health: diagnosis.StreamHealth | None,
    current_status: Mapping[str, Any],
) -> None:
    """ProjectionStalled/ProjectionDegraded and status.projector.health from the group and,
    when the databases answered this reconcile, the catch-up sweep's watermark.

    "No progress" takes two readings over time: the last marker and since when it holds
    are kept in status.projector.progress, so an operator restart keeps them.
    """
    if health is None:
        stream = next((c for c in out.conditions if c.type == status.STREAM), None)
        why = f"{stream.reason}: {stream.message}" if stream is not None else ""
        out.conditions += status.projection_conditions(None, why)
        return
    catch_up = None
    databases = next((c for c in out.conditions if c.type == status.DATABASES), None)
    if databases is not None and databases.status and creds.current is not None:
        tls = await database_tls(api, spec)
        me = creds.current
        catch_up = await provisioning.catch_up_health(
            spec.write_db, spec.read_db, me.username, me.password, tls
        )
    previous = (current_status.get("projector") or {}).get("progress")
    progress, still_for = diagnosis.progress_since(previous, health, time.time())
    judgement = diagnosis.judge(health, catch_up, None, BOUNDS, still_for)
    out.conditions += status.projection_conditions(judgement)
    projector = out.extra.setdefault("projector", {})
    projector["health"] = status.projection_health(health, judgement, catch_up)
    projector["progress"] = progress


@dataclass(frozen=True)
class _Rebuilds:
    """What the rebuild step of one reconcile works with: where it reports (``out``), the
    stack, the login it reads the read DB with (``me``, the stack's role) and the status the
    reconcile started from."""

    out: Outcome
    api: client.ApiClient
    spec: StackSpec
    me: Login
    current_status: Mapping[str, Any]
    adopt: Adopt


async def _rebuilds(ctx: _Rebuilds, request: str) -> None:
    """Condition Rebuilding, status.rebuild and status.readModels: the stack's rebuild Jobs,
    one at a time (rebuild_job.py). Trouble here fails no other part: the live read models
    keep serving reads and writes."""
    try:
        await _rebuild_step(ctx, request)
    except ProvisioningError as exc:
        ctx.out.conditions.append(
            status.Condition(status.REBUILDING, None, exc.reason, exc.message)
        )
    except ApiException as exc:
        ctx.out.conditions.append(
            status.Condition(
                status.REBUILDING,
                None,
                "RebuildJobUnreadable",
                f"cannot read, create or delete the rebuild Jobs: HTTP {exc.status}",
            )
        )


async def _read_rebuilds(
    ctx: _Rebuilds, runs: list[str]
) -> tuple[dict[str, int], dict[str, RunProgress], str]:
    """The live versions and the progress of ``runs``, as the read DB records them (read as
    the stack's role); ``why`` is not empty when the read DB could not tell."""
    spec, me = ctx.spec, ctx.me
    tls = await database_tls(ctx.api, spec)
    try:
        # Bounded: a read DB that hangs must not hold the stack's reconcile.
        async with (
            asyncio.timeout(READ_PROGRESS_TIMEOUT),
            provisioning.stack_session(spec.read_db, me.username, me.password, tls) as conn,
        ):
            live = await live_versions(conn)
            found = {name: await read_run(conn, name) for name in runs}
    except ProvisioningError as exc:
        return {}, {}, exc.message
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        return (
            {},
            {},
            f"reading the rebuilds' progress in {spec.read_db.name}: {type(exc).__name__}",
        )
    return live, {name: run for name, run in found.items() if run is not None}, ""


async def _rebuild_step(ctx: _Rebuilds, request: str) -> None:
    out, api, spec, current_status = ctx.out, ctx.api, ctx.spec, ctx.current_status
    selector = rebuild_job.job_selector(spec)
    jobs = [
        j
        for j in await kube.list_jobs(api, spec.namespace, selector)
        if kube.controller_uid(j) == spec.uid and rebuild_job.run_of(j) is not None
    ]
    pods = await kube.list_pods(api, spec.namespace, selector)
    by_name = {j["metadata"]["name"]: j for j in jobs}
    recorded: Mapping[str, Any] = current_status.get("rebuild") or {}
    last = rebuild_job.recorded_runs(current_status)
    versions = spec.model_versions
    current = recorded.get("job") if recorded.get("outcome") == rebuild_job.RUNNING else None
    active = [j for j in jobs if not rebuild_job.finished(j)]
    if current is None and active:  # the status lost (a patch that failed): the cluster tells
        current = active[0]["metadata"]["name"]
    live, progress, why = await _read_rebuilds(ctx, [current] if current else [])
    if why:
        live = rebuild_job.recorded_live(current_status)
    shown: dict[str, Any] = dict(recorded)
    for name, message in await _cancel_unwanted(ctx, active, last):
        del by_name[name]
        if name == current:
            shown.update(outcome=rebuild_job.CANCELLED, phase="cancelled", message=message)
            current = None
    if current is not None:
        job = by_name.get(current)
        found = progress.get(current)
        shown = _rebuild_progress(out, job, current, recorded, last, pods, live, found, why)
    busy = [j for j in by_name.values() if not rebuild_job.finished(j)]
    handled = rebuild_job.handled_request(current_status, request)
    if not busy and not rebuild_job.pods_active(pods) and not why:
        run = rebuild_job.plan(versions, live, last, request, handled)
        if run is None:
            handled = request
        else:
            shown = await _start_rebuild(ctx, run, last, live)
    _report_rebuilds(out, versions, live, last, shown, handled, why)


async def _cancel_unwanted(
    ctx: _Rebuilds, active: list[dict[str, Any]], last: dict[str, rebuild_job.LastRun]
) -> list[tuple[str, str]]:
    """Delete each running rebuild Job the spec no longer wants (its model gone, its version
    changed); (name, message) of each."""
    spec = ctx.spec
    cancelled = []
    for job in active:
        name, run = job["metadata"]["name"], rebuild_job.run_of(job)
        assert run is not None
        if job["metadata"].get("deletionTimestamp") or rebuild_job.still_wanted(
            run, spec.model_versions
        ):
            continue
        await kube.delete_object(ctx.api, "Job", spec.namespace, name)
        message = (
            f"cancelled Job {name} (rebuild of {run.model} to version {run.version}): the spec "
            f"now asks for {dict(spec.model_versions).get(run.model, 'no such model')}; the "
            "live model is untouched"
        )
        ctx.out.changes.append(provisioning.Change("RebuildCancelled", message))
        last[run.model] = rebuild_job.LastRun(name, run.version, run.request, rebuild_job.CANCELLED)
        cancelled.append((name, message))
    return cancelled


def _report_rebuilds(
    out: Outcome,
    versions: tuple[tuple[str, int], ...],
    live: Mapping[str, int],
    last: Mapping[str, rebuild_job.LastRun],
    shown: dict[str, Any],
    handled: str,
    why: str,
) -> None:
    """Condition Rebuilding, status.rebuild, status.readModels and status.rebuildRequest."""
    result = shown.get("outcome")
    if why and result is None:  # never rebuilt, and what is live cannot be read now
        out.conditions.append(status.Condition(status.REBUILDING, None, "ReadDbUnreadable", why))
    else:
        message = str(shown.get("message") or "")
        out.conditions.append(
            rebuild_job.condition(
                result,
                shown.get("phase"),
                message or f"read models live: {rebuild_job.describe_live(versions, live)}",
            )
        )
    if shown:
        out.extra["rebuild"] = shown
    out.extra["rebuildRequest"] = handled
    out.extra["readModels"] = [
        {
            "name": name,
            "version": live.get(name, rebuild_job.INITIAL_VERSION),
            **({"lastRun": _last_run(last[name])} if name in last else {}),
        }
        for name, _ in versions
    ]


def _last_run(last: rebuild_job.LastRun) -> dict[str, Any]:
    return {
        "job": last.job,
        "version": last.version,
        "request": last.request,
        "outcome": last.outcome,
    }


def _rebuild_progress(
    out: Outcome,
    job: Mapping[str, Any] | None,
    name: str,
    recorded: Mapping[str, Any],
    last: dict[str, rebuild_job.LastRun],
    pods: list[dict[str, Any]],
    live: Mapping[str, int],
    progress: RunProgress | None,
    why: str,
) -> dict[str, Any]:
    """status.rebuild of the running (or just finished) Job ``name``, and its Event once it
    ended: swapped, failed, cancelled (deleted by a person) or rolled back."""
    if job is None:  # deleted, not by the operator: cancelled
        run = next(
            (rebuild_job.Run(m, r.version, r.request) for m, r in last.items() if r.job == name),
            None,
        )
        message = f"Job {name} was deleted: the rebuild is cancelled; the live model is untouched"
        out.changes.append(provisioning.Change("RebuildCancelled", message))
        if run is not None:
            last[run.model] = rebuild_job.LastRun(
                name, run.version, run.request, rebuild_job.CANCELLED
            )
        return {
            **recorded,
            "outcome": rebuild_job.CANCELLED,
            "phase": "cancelled",
            "message": message,
        }
    run = rebuild_job.run_of(job)
    assert run is not None
    own_pods = [
        p for p in pods if (p["metadata"].get("labels") or {}).get(rebuild_job.JOB_LABEL) == name
    ]
    state = migration_job.job_outcome(job, own_pods)
    result, message = rebuild_job.outcome(state, progress, live.get(run.model), run)
    if result != rebuild_job.RUNNING and why:
        # The Job ended; what it did is read from the read DB, which does not answer now.
        result, message = (
            rebuild_job.RUNNING,
            (f"{state.message}; its outcome is read once the read DB answers ({why})"),
        )
    last[run.model] = rebuild_job.LastRun(name, run.version, run.request, result)
    if result != rebuild_job.RUNNING:
        reason, warning = {
            rebuild_job.SWAPPED: ("RebuildSwapped", False),
            rebuild_job.FAILED: ("RebuildFailed", True),
            rebuild_job.CANCELLED: ("RebuildCancelled", False),
            rebuild_job.ROLLED_BACK: ("RebuildRolledBack", True),
        }[result]
        if result == rebuild_job.FAILED:
            message += (
                f"; the live version {live.get(run.model, rebuild_job.INITIAL_VERSION)} of "
                f"{run.model} is untouched; a new version or a new value of "
                f"{rebuild_job.REBUILD_ANNOTATION} runs it again"
            )
        out.changes.append(
            provisioning.Change(reason, message[: rebuild_job.MESSAGE_LIMIT], warning=warning)
        )
    return rebuild_job.rebuild_status(run, name, result, progress, message)


async def _start_rebuild(
    ctx: _Rebuilds,
    run: rebuild_job.Run,
    last: dict[str, rebuild_job.LastRun],
    live: Mapping[str, int],
) -> dict[str, Any]:
    """Create the Job of ``run``; its model's last run is it from now on."""
    spec = ctx.spec
    previous = last.get(run.model)
    name = rebuild_job.job_name(spec, run, previous.job if previous else "")
    rendered = rebuild_job.rebuild_job(spec, run, name)
    await check_pod_secrets(ctx.api, spec, [rendered])
    await _apply(ctx.api, spec, rendered, ctx.adopt)
    why = (
        f"annotation {rebuild_job.REBUILD_ANNOTATION}={run.request!r}"
        if run.request
        else (
            f"spec version {run.version} above the live "
            f"{live.get(run.model, rebuild_job.INITIAL_VERSION)}"
        )
    )
    message = f"rebuilding {run.model} to version {run.version} in Job {name} ({why})"
    ctx.out.changes.append(provisioning.Change("RebuildStarted", message))
    last[run.model] = rebuild_job.LastRun(name, run.version, run.request, rebuild_job.RUNNING)
    return rebuild_job.rebuild_status(run, name, rebuild_job.RUNNING, None, message)


def _switch(out: Outcome, creds: Credentials) -> Credentials:
    """A rotation's step 2, once both servers accept the next login: the pods move to it."""
    ok = {c.type for c in out.conditions if c.status}
    if creds.next is None or not {status.DATABASES, status.STREAM} <= ok:
        return creds
    switched = creds.switched()
    out.changes.append(
        Change(
            "CredentialsSwitched",
            f"the pods now get login {creds.next.username} (new password): rolling restart",
        )
    )
    return switched


async def _complete_rotation(
    out: Outcome,
    api: client.ApiClient,
    spec: StackSpec,
    creds: Credentials,
    redis: RedisAccess,
    adopt: Adopt,
) -> Credentials:
    """A rotation's step 3: once every Deployment runs only pods of the current template
    (which carry the new credentials), the old login and Redis password are revoked."""
    if creds.next is not None or creds.retiring is None or creds.active is None:
        return creds
    waiting = []
    for component in manifests.COMPONENTS:
        name = manifests.child_name(spec, component)
        deployment = await _read_deployment(api, spec.namespace, name)
        why = f"{name}: absent" if deployment is None else status.rolled_out(deployment)
        if why is not None:
            waiting.append(why)
    if waiting:
        out.extra["rotation_waiting"] = "; ".join(waiting)
        return creds
    tls = await database_tls(api, spec)
    for db in (spec.write_db, spec.read_db):
        login = await admin_login(api, spec, db)
        out.changes += await provisioning.revoke_other_logins(
            db, login, spec.role, creds.active, spec.uid, tls
        )
    out.changes += await _acl_user(redis, spec, creds.completed())
    done = creds.completed()
    await apply_credentials(api, spec, done, redis, adopt)
    out.changes.append(
        Change(
            "RotationCompleted",
            f"every Deployment rolled out; only login {creds.active.username} is accepted",
        )
    )
    return done


def _report_rotation(out: Outcome, creds: Credentials) -> None:
    """Condition CredentialsCurrent and status.credentials: the rotation's progress."""
    waiting = out.extra.pop("rotation_waiting", "")
    if creds.phase == rotation.PREPARING:
        assert creds.next is not None
        message = f"setting login {creds.next.username} on the servers; the pods keep their login"
    elif creds.phase == rotation.ROLLING_OUT:
        assert creds.active is not None
        message = (
            f"pods move to login {creds.active.username}; login {creds.retiring} is still "
            f"accepted until every Deployment has rolled out" + (f" ({waiting})" if waiting else "")
        )
    else:
        who = creds.active.username if creds.active else "?"
        message = f"the pods' login {who} is the only one accepted"
    out.conditions.append(
        status.Condition(status.CREDENTIALS, creds.phase == rotation.CURRENT, creds.phase, message)
    )
    out.extra["credentials"] = rotation.status_of(creds, message)


def _stream_provisioned(out: Outcome, current_status: Mapping[str, Any]) -> bool:
    """The stream was marked as this stack's: now, or in an earlier reconcile (its status
    records it; from then on drift correction of the children never waits on Redis)."""
    now = any(c.type == status.STREAM and c.status for c in out.conditions)
    return now or bool((current_status.get("stream") or {}).get("name"))


async def _databases(
    out: Outcome, api: client.ApiClient, spec: StackSpec, creds: Credentials, owner: Owner
) -> None:
    try:
        versions, changes = await provision_databases(api, spec, creds, owner)
    except ProvisioningError as exc:
        out.fail(status.DATABASES, exc)
        return
    out.changes += changes
    out.ok(
        status.DATABASES,
        "Migrated",
        f"databases {spec.write_db.name} (schema {versions['write']}) and "
        f"{spec.read_db.name} (schema {versions['read']}) answer as {spec.role}",
    )
    out.extra["databases"] = {
        "write": spec.write_db.name,
        "read": spec.read_db.name,
        "role": spec.role,
        "schemaVersions": versions,
        "migratedBy": None,  # written by operators that ran their own copy of the migrations
    }


async def _migrations(
    out: Outcome,
    api: client.ApiClient,
    spec: StackSpec,
    me: Login,
    current_status: Mapping[str, Any],
    adopt: Adopt,
) -> StackSpec | None:
    """MigrationsApplied, running the migration Job of the stack's image when it is due.

    Returns the spec the Deployments are rendered from: the stack's own once its image's
    migrations succeeded, else the image they already run (kept serving meanwhile), or None
    when none ever ran.
    """
    image, expected = migration_job.recorded_migration(current_status)
    versions = (out.extra.get("databases") or {}).get("schemaVersions")
    if versions is None:  # the databases failed in this reconcile: no Job can succeed now
        out.conditions.append(
            status.Condition(
                status.MIGRATIONS,
                None if image == spec.image else False,
                "WaitingForDatabases",
                "the schema versions are checked (and the migration Job run) once the "
                "databases answer as the stack's role",
            )
        )
        return spec if image == spec.image else await _serving_spec(api, spec, image)
    if image == spec.image and expected is not None and versions == expected:
        out.ok(
            status.MIGRATIONS,
            "SchemaCurrent",
            f"schema write={expected['write']} read={expected['read']}, as {image} expects",
        )
        return spec
    try:
        outcome = await migration_job_outcome(out, api, spec, adopt)
        if outcome.phase == migration_job.SUCCEEDED:
            if await _record_migration(out, api, spec, me, outcome):
                return spec
        elif outcome.reason:  # its pod cannot start (a bad image): say why, as for a Deployment
            error_type = (
                PermanentProvisioningError
                if outcome.reason in PERMANENT_REASONS
                else ProvisioningError
            )
            out.fail(status.MIGRATIONS, error_type(outcome.reason, outcome.message))
        elif outcome.phase == migration_job.FAILED:
            out.fail(
                status.MIGRATIONS, PermanentProvisioningError("MigrationJobFailed", outcome.message)
            )
        else:
            out.conditions.append(
                status.Condition(status.MIGRATIONS, False, "MigrationJobRunning", outcome.message)
            )
    except ProvisioningError as exc:
        out.fail(status.MIGRATIONS, exc)
    return await _serving_spec(api, spec, image)


async def migration_job_outcome(
    out: Outcome, api: client.ApiClient, spec: StackSpec, adopt: Adopt
) -> migration_job.JobOutcome:
    """The outcome of the migration Job of ``spec.image``; created when there is none."""
    name = manifests.migration_job_name(spec)
    try:
        job = await kube.read_object(api, "Job", spec.namespace, name)
        if job is not None and kube.controller_uid(job) != spec.uid:
            raise _not_ours("Job", name, spec)
        annotations = (job or {}).get("metadata", {}).get("annotations") or {}
        if job is not None and annotations.get(manifests.IMAGE_ANNOTATION) != spec.image:
            # A digest cut short and shared by two images: never read the other's outcome.
            raise ProvisioningError(
                "MigrationJobConflict",
                f"Job {name} migrated image {annotations.get(manifests.IMAGE_ANNOTATION)}, "
                f"not {spec.image}: it is removed by its TTL, or delete it",
            )
        rendered = manifests.migration_job(spec)
        if job is not None and not _runs_as_rendered(job, rendered):
            # The owner uid and the annotation can be copied by anyone who may create Jobs:
            # only a Job that runs what the operator would run counts as the migration.
            raise PermanentProvisioningError(
                "MigrationJobNotOurs",
                f"Job {name} does not run the stack's migration (image, command, environment "
                "differ from the operator's): delete it",
            )
        if job is None:
            await check_pod_secrets(api, spec, [rendered])
            await _apply(api, spec, rendered, adopt)
            out.changes.append(
                Change("MigrationJobCreated", f"migrating with image {spec.image} in Job {name}")
            )
            return migration_job.JobOutcome(migration_job.RUNNING, f"Job {name} created")
        pods = await kube.list_pods(api, spec.namespace, {"cqrs.dev/migration-job": name})
    except ApiException as exc:
        raise ProvisioningError(
            "MigrationJobUnreadable", f"cannot read Job {name} or its pods: HTTP {exc.status}"
        ) from exc
    return migration_job.job_outcome(job, pods)


_JOB_CONTAINER_FIELDS = ("image", "command", "args", "env", "envFrom", "volumeMounts")


def _runs_as_rendered(live: Mapping[str, Any], rendered: Mapping[str, Any]) -> bool:
    """Whether a live Job's containers run what ``rendered`` would (the fields we set; the
    API server's defaults aside)."""

    def containers(job: Mapping[str, Any]) -> list[dict[str, Any]]:
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        return [
            {f: c.get(f) or None for f in _JOB_CONTAINER_FIELDS}
            for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
        ]

    def volumes(job: Mapping[str, Any]) -> list[Any]:
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        return sorted(
            (
                str(v.get("name")),
                str((v.get("secret") or {}).get("secretName")),
                str((v.get("configMap") or {}).get("name")),
            )
            for v in pod.get("volumes") or []
        )

    return containers(live) == containers(rendered) and volumes(live) == volumes(rendered)


async def _record_migration(
    out: Outcome,
    api: client.ApiClient,
    spec: StackSpec,
    me: Login,
    outcome: migration_job.JobOutcome,
) -> bool:
    """After a successful Job: record the image and the versions in the status; True when
    the databases are at the versions the image expects."""
    versions = await read_schema_versions(api, spec, me)
    # Without a report (an image older than it) the Job's success means every migration the
    # image carries is applied: it expects what it left.
    expected = outcome.expected or versions
    databases = out.extra.setdefault("databases", {})
    databases.update(schemaVersions=versions)
    if versions == expected:
        # Recorded only when the schema is what the image expects: the Deployments roll to
        # the migrated image (a rollback below the schema, or a Job that left the schema
        # behind, keeps them on the image they run).
        databases.update(migratedImage=spec.image, expectedSchemaVersions=expected)
    if versions != expected:
        out.conditions.append(
            status.Condition(
                status.MIGRATIONS,
                False,
                "SchemaMismatch",
                f"databases at write={versions['write']} read={versions['read']}, image "
                f"{spec.image} expects write={expected['write']} read={expected['read']}",
            )
        )
        return False
    out.changes.append(
        Change(
            "MigrationsApplied",
            f"image {spec.image} migrated write to {versions['write']}, read to {versions['read']}",
        )
    )
    out.ok(status.MIGRATIONS, "SchemaCurrent", f"{outcome.message}; schema as {spec.image} expects")
    return True


async def _serving_spec(
    api: client.ApiClient, spec: StackSpec, migrated_image: str | None
) -> StackSpec | None:
    """The spec with the image the Deployments run until the new one is migrated: the last
    migrated image, else the image of the live write-api (a stack migrated by an operator
    that ran migrations itself), else None (a new stack waits)."""
    image = migrated_image
    if image is None:
        live = await _read_deployment(api, spec.namespace, manifests.child_name(spec, "write-api"))
        containers = ((live or {}).get("spec") or {}).get("template", {}).get("spec", {})
        image = next((c.get("image") for c in containers.get("containers") or []), None)
    if not image:
        return None
    repository, tag = migration_job.split_image(image)
    return replace(spec, image_repository=repository, image_tag=tag)


async def _stream(
    out: Outcome, redis: RedisAccess, spec: StackSpec, creds: Credentials, owner: Owner
) -> diagnosis.StreamHealth | None:
    url = redis.operator_url
    # Without a Redis admin Secret the pods reach all of Redis anyway: adopting adds nothing.
    owner = replace(owner, adopt_allowed=redis.admin is None or redis.admin.may_adopt)
    try:
        out.changes += await provisioning.ensure_stream(
            url, spec.stream_name, spec.consumer_group, owner, redis.ca_pem
        )
        if redis.admin is not None:
            out.changes += await _acl_user(redis, spec, creds)
            out.ok(
                status.REDIS_ISOLATION,
                "AclUser",
                f"pods log in as Redis ACL user {spec.redis_user}, limited to the stack's stream",
            )
        else:
            out.conditions.append(
                status.Condition(
                    status.REDIS_ISOLATION,
                    False,
                    "NoAdminCredentials",
                    "spec.redis.adminSecret is not set: pods use the Redis URL as given",
                )
            )
        health = await provisioning.stream_health(
            url, spec.stream_name, spec.consumer_group, BOUNDS.stopped_after, redis.ca_pem
        )
    except OwnershipRefused as exc:
        out.fail(status.STREAM, exc)
        await _remove_acl_user(out, redis, spec)  # granted before the refusal, if ever
        return None
    except ProvisioningError as exc:
        out.fail(status.STREAM, exc)
        if redis.admin is not None and not any(
            c.type == status.REDIS_ISOLATION for c in out.conditions
        ):
            # Not verified in this reconcile: the last True must not stand as if it were.
            out.conditions.append(
                status.Condition(
                    status.REDIS_ISOLATION,
                    None,
                    exc.reason,
                    f"the ACL user could not be checked: {exc.message}",
                )
            )
        return None
    out.ok(
        status.STREAM,
        "GroupExists",
        f"stream {spec.stream_name} with consumer group {spec.consumer_group}",
    )
    out.extra["stream"] = {"name": spec.stream_name, "consumerGroup": spec.consumer_group}
    return health


async def _acl_user(redis: RedisAccess, spec: StackSpec, creds: Credentials) -> list[Change]:
    """The stack's ACL user accepts the logins of ``creds`` (and, during a rotation, keeps
    the passwords it has: the pods not yet rolled out use them)."""
    if redis.admin is None:
        return []
    return await provisioning.ensure_acl_user(
        redis.base_url,
        redis.admin,
        spec.redis_user,
        spec.stream_name,
        [login.password for login in creds.accepted],
        redis.ca_pem,
        exact=not creds.rotating,
    )


async def _remove_acl_user(out: Outcome, redis: RedisAccess, spec: StackSpec) -> None:
    """A refused stack keeps no Redis ACL user: it may hold the keys of the stream that the
    refusal protects (a pre-squatted ``<stream>:dead``)."""
    if redis.admin is None:
        return
    try:
        if await provisioning.delete_acl_user(
            redis.base_url, redis.admin, spec.redis_user, redis.ca_pem
        ):
            out.changes.append(
                Change("AclUserDeleted", f"deleted Redis ACL user {spec.redis_user} (refused)")
            )
    except ProvisioningError as exc:
        out.errors.append(exc)


async def teardown(api: client.ApiClient, spec: StackSpec) -> tuple[list[str], list[str]]:
    """deletionPolicy Delete: drop what this stack created; return (dropped, left behind)."""
    # Each database with the login checked for its own server (admin-hosts included).
    logins = [(db, await admin_login(api, spec, db)) for db in (spec.write_db, spec.read_db)]
    tls = await database_tls(api, spec)
    dropped, left = await provisioning.drop_owned(logins, spec.role, spec.uid, tls)
    redis = await redis_access(api, spec)
    deleted = await provisioning.delete_owned_stream(
        redis.operator_url, spec.stream_name, spec.uid, redis.ca_pem
    )
    if deleted:
        dropped.append(f"stream {spec.stream_name}")
    elif deleted is False:  # None: already gone (a teardown interrupted after this step)
        left.append(f"stream {spec.stream_name} (not created by this stack)")
    if redis.admin is not None and await provisioning.delete_acl_user(
        redis.base_url, redis.admin, spec.redis_user, redis.ca_pem
    ):
        dropped.append(f"Redis ACL user {spec.redis_user}")
    return dropped, left

"""A CqrsStack's spec as typed values, with the defaults and derived names filled in.

The spec is validated by the same models the CRD's schema is generated from
(``cqrs_stack.stack_spec``): their defaults fill in what an object created before a default
existed lacks. This module derives what the schema cannot: database, role and stream names
from the stack's namespace and name.

Default names are unique per (namespace, name): a readable prefix plus a short hash of the
full identity, so that ``a-b``/``c`` and ``a``/``b-c`` never meet on a shared server. Names a
stack recorded in its status (``status.databases``, ``status.stream``) win over the defaults:
a stack keeps the names it was provisioned with across operator upgrades.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from redis.connection import parse_url

from cqrs_stack import stack_spec as models
from cqrs_stack.stack_spec import DNS_SUBDOMAIN as DNS_SUBDOMAIN
from cqrs_stack.stack_spec import IDENTIFIER as IDENTIFIER
from cqrs_stack.stack_spec import MAX_STACK_NAME as MAX_STACK_NAME
from cqrs_stack.stack_spec import SYSTEM_DATABASES as SYSTEM_DATABASES
from cqrs_stack.stack_spec import (
    ApiAutoscaling,
    CqrsStackSpec,
    MigrationJob,
    PodControls,
    ProjectorAutoscaling,
    Resources,
    Tracing,
)

from . import __version__
from .schema import GROUP as GROUP
from .schema import KIND as KIND
from .schema import PLURAL as PLURAL
from .schema import VERSION as VERSION

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Keys the operator keeps next to a stream: never a stack's stream name (see provisioning).
RESERVED_STREAM_SUFFIXES = (":dead", ":owner")
# The shape of a default database name: <readable>_<8 hex>_write|read (unique_identifier).
DEFAULT_DATABASE_SHAPE = re.compile(r"^.*_[0-9a-f]{8}_(write|read)$")
# The shape of a default stream name: <namespace>.<name>-events (a namespace holds no ".").
DEFAULT_STREAM_SHAPE = re.compile(r"^(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\..*-events$")
DELETION_POLICIES = ("Retain", "Delete")
NAME_HASH_LENGTH = 8
# Bounds, defaults and enums live in the models (cqrs_stack.stack_spec), nowhere else.
Autoscaling = ProjectorAutoscaling


class SpecError(ValueError):
    """A spec the operator cannot act on; the message names the field."""


@dataclass(frozen=True)
class Component:
    """One Deployment of the stack: replicas, container resources, pod controls, its HPA."""

    replicas: int
    resources: Resources = field(default_factory=Resources)
    pods: PodControls = field(default_factory=PodControls)
    hpa: ApiAutoscaling | None = None  # set: a HorizontalPodAutoscaler owns replicas


@dataclass(frozen=True)
class Projector(Component):
    batch_size: int = models.DEFAULT_BATCH_SIZE
    poll_interval: float = models.DEFAULT_POLL_INTERVAL
    max_deliveries: int = models.DEFAULT_MAX_DELIVERIES
    autoscaling: ProjectorAutoscaling = field(default_factory=ProjectorAutoscaling)


@dataclass(frozen=True)
class Database:
    """Where one database lives and which Secret holds the admin's username and password."""

    host: str
    port: int
    admin_secret: str
    name: str


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


TLS_MODES = ("disable", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class CaBundle:
    """A PEM CA bundle: key ``key`` of a ConfigMap or an opted-in Secret (``kind``)."""

    kind: str
    name: str
    key: str


@dataclass(frozen=True)
class DatabaseTls:
    """TLS to both PostgreSQL servers (operator and pods): libpq's sslmode and a CA bundle."""

    mode: str
    ca: CaBundle | None = None


@dataclass(frozen=True)
class StackSpec:
    """Everything the operator needs to render and provision one stack."""

    namespace: str
    name: str
    image_repository: str
    image_tag: str
    image_pull_policy: str
    write_api: Component
    read_api: Component
    projector: Projector
    stream_name: str
    consumer_group: str
    stream_max_length: int
    write_db: Database
    read_db: Database
    redis_url: str | None
    redis_url_secret: SecretKeyRef | None
    deletion_policy: str
    redis_admin_secret: str | None = None
    database_tls: DatabaseTls | None = None
    redis_ca: CaBundle | None = None
    role_name: str = ""
    adopt: bool = False
    uid: str = ""
    write_token_secret: SecretKeyRef | None = None
    db_pool_min_size: int = models.Pool().min_size
    db_pool_max_size: int = models.Pool().max_size
    log_level: str = "info"
    read_models: tuple[str, ...] = ("records",)  # the names: READ_MODELS
    # (name, version) of each read model, in spec order: a version above the live one is
    # rebuilt (rebuild_job.py).
    model_versions: tuple[tuple[str, int], ...] = (("records", 1),)
    migration_job: MigrationJob = field(default_factory=MigrationJob)
    tracing: Tracing = field(default_factory=Tracing)  # the pods' TRACING and OTEL_* (manifests)
    reserved: str = ""  # why a name the spec chose is another stack's (reserved_names)

    @property
    def image(self) -> str:
        return f"{self.image_repository}:{self.image_tag}"

    @property
    def redis_user(self) -> str:
        """The stack's Redis ACL user: a namespace holds no ".", so names never meet."""
        return f"cqrs.{self.namespace}.{self.name}"

    @property
    def role(self) -> str:
        """The per-stack PostgreSQL role that owns both databases."""
        return self.role_name or default_names(self.namespace, self.name).role


@dataclass(frozen=True)
class DefaultNames:
    """The names a stack gets when its spec names none: unique per (namespace, name)."""

    role: str
    write_db: str
    read_db: str
    stream: str


def identity_hash(namespace: str, name: str) -> str:
    """A short hash of the stack's full identity; ``/`` never occurs in either part."""
    return hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:NAME_HASH_LENGTH]


def unique_identifier(prefix: str, text: str, digest: str, suffix: str = "") -> str:
    """``<prefix><readable text>_<digest><suffix>``, cut to 63 bytes, a valid identifier.

    The readable part is lossy (``-`` becomes ``_``, long names are cut); the digest of the
    full identity keeps distinct stacks apart.
    """
    tail = f"_{digest}{suffix}"
    readable = re.sub(r"[^a-z0-9_]", "_", text.lower())
    head = prefix + readable
    if not re.match(r"[a-z_]", head[:1]):
        head = "_" + head
    return head[: 63 - len(tail)] + tail


def default_names(namespace: str, name: str) -> DefaultNames:
    digest = identity_hash(namespace, name)
    text = f"{namespace}_{name}"
    return DefaultNames(
        role=unique_identifier("cqrs_", text, digest),
        write_db=unique_identifier("", text, digest, "_write"),
        read_db=unique_identifier("", text, digest, "_read"),
        # A namespace holds no ".", so "<namespace>." keeps streams of namespaces apart.
        stream=f"{namespace}.{name}-events",
    )


def check_identifier(value: str, field_path: str) -> str:
    """Return ``value`` if it is a safe SQL identifier, else raise naming the field."""
    if not IDENTIFIER.match(value):
        raise SpecError(f"{field_path}={value!r} must match {IDENTIFIER.pattern}")
    return value


def reserved_names(spec: Mapping[str, Any], namespace: str, defaults: DefaultNames) -> str:
    """Why a name the spec chose is reserved for another stack ("" when none is).

    Default names are predictable: an explicit database named like a default
    (``<prefix>_<8 hex>_write|read``) or a stream named like another namespace's default
    (``<namespace>.<name>-events``) would squat that stack's future object; a stream name
    ending in ``:dead`` or ``:owner`` would be another stream's dead letters or owner key.
    The operator refuses such a stack at reconcile (reason ReservedName), so that it still
    removes what the stack was given before and deletion still runs.
    """
    databases = spec.get("databases") or {}
    for kind in ("write", "read"):
        name = (databases.get(kind) or {}).get("database")
        if (
            isinstance(name, str)
            and DEFAULT_DATABASE_SHAPE.match(name)
            and name not in (defaults.write_db, defaults.read_db)
        ):
            return (
                f"spec.databases.{kind}.database={name!r} has the shape of a default database "
                "name (<prefix>_<8 hex>_write|read), reserved for the stack it derives from"
            )
    stream = (spec.get("stream") or {}).get("name")
    if not isinstance(stream, str) or not stream:
        return ""
    if stream.endswith(RESERVED_STREAM_SUFFIXES):
        return (
            f"spec.stream.name={stream!r} ends in a suffix reserved for the keys the operator "
            f"keeps next to a stream {RESERVED_STREAM_SUFFIXES}"
        )
    match = DEFAULT_STREAM_SHAPE.match(stream)
    if match and match["namespace"] != namespace:
        return (
            f"spec.stream.name={stream!r} has the shape of a default stream name of namespace "
            f"{match['namespace']!r}, reserved for its stacks"
        )
    return ""


def check_redis_url(url: str, field_path: str) -> str:
    """Return ``url`` if its host is a DNS name or an IP address, else raise (no password shown)."""
    try:
        parse_url(url)
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:  # the message may quote the URL: name the field only
        raise SpecError(f"{field_path} is not a valid Redis URL") from exc
    if parts.fragment or "#" in url or "@" in f"{parts.path}?{parts.query}":
        # A "#" or a "@" past the host makes URL parsers disagree about the host.
        raise SpecError(f"{field_path} must not hold '#', or '@' after the host")
    check_host(host, f"{field_path} host")
    return url


def recorded_names(status: Mapping[str, Any] | None) -> dict[str, str]:
    """Names the stack was provisioned with, as its status recorded them (may be empty)."""
    status = status or {}
    dbs = status.get("databases") or {}
    out = {k: dbs[k] for k in ("write", "read", "role") if isinstance(dbs.get(k), str) and dbs[k]}
    stream = (status.get("stream") or {}).get("name")
    if isinstance(stream, str) and stream:
        out["stream"] = stream
    return out


def describe_invalid(exc: ValidationError) -> str:
    """One clause per invalid field, named by its path under spec; the input is never shown
    (a Redis URL may carry a password)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        path = ".".join(["spec", *(str(p) for p in error["loc"])])
        parts.append(f"{path}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def check_host(host: object, field_path: str) -> str:
    """Return ``host`` if it is a DNS name or an IP address, else raise naming the field."""
    if not isinstance(host, str) or not host:
        raise SpecError(f"{field_path} is required")
    try:
        return models.check_host(host)
    except ValueError:
        raise SpecError(
            f"{field_path}={host[:80]!r} must be a DNS name (ASCII) or an IP address"
        ) from None


def _database(raw: models.Database, name: str, path: str) -> Database:
    return Database(
        host=raw.host,
        port=raw.port,
        admin_secret=raw.admin_secret,
        name=check_identifier(name, f"{path}.database"),
    )


def _component(raw: models.WriteApi | models.ReadApi) -> Component:
    return Component(
        raw.replicas,
        resources=raw.resources,
        pods=raw,
        hpa=raw.autoscaling if raw.autoscaling.enabled else None,
    )


def _projector(raw: models.Projector) -> Projector:
    return Projector(
        replicas=raw.replicas,
        resources=raw.resources,
        pods=raw,
        batch_size=raw.batch_size,
        poll_interval=raw.poll_interval,
        max_deliveries=raw.max_deliveries,
        autoscaling=raw.autoscaling or ProjectorAutoscaling(),
    )


def _ca(config_map: Any, secret: Any) -> CaBundle | None:
    if config_map is not None:
        return CaBundle("ConfigMap", config_map.name, config_map.key)
    if secret is not None:
        return CaBundle("Secret", secret.name, secret.key)
    return None


def _database_tls(raw: models.DatabaseTls | None) -> DatabaseTls | None:
    if raw is None:
        return None
    return DatabaseTls(raw.mode, _ca(raw.ca_config_map, raw.ca_secret))


def validate(spec: Mapping[str, Any]) -> CqrsStackSpec:
    """The spec checked against the models (bounds, enums, shapes); SpecError naming fields."""
    try:
        return CqrsStackSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(describe_invalid(exc)) from None


def parse_spec(
    spec: Mapping[str, Any],
    *,
    namespace: str,
    name: str,
    uid: str = "",
    status: Mapping[str, Any] | None = None,
    default_tag: str | None = None,
) -> StackSpec:
    """Return the typed spec of stack ``namespace/name``; raise SpecError naming a bad field.

    ``status`` supplies the names recorded at provisioning, which win over the defaults;
    ``default_tag`` is the image tag of a stack that pins none (default: this version).
    """
    if len(name) > MAX_STACK_NAME:
        raise SpecError(f"metadata.name must be at most {MAX_STACK_NAME} characters: {name!r}")
    model = validate(spec)
    if model.redis.url is not None:
        check_redis_url(model.redis.url, "spec.redis.url")
    defaults = default_names(namespace, name)
    recorded = recorded_names(status)
    token = model.write_api.auth.token_secret
    return StackSpec(
        namespace=namespace,
        name=name,
        image_repository=model.image.repository,
        image_tag=model.image.tag or default_tag or __version__,
        image_pull_policy=model.image.pull_policy,
        write_api=_component(model.write_api),
        read_api=_component(model.read_api),
        projector=_projector(model.projector),
        stream_name=model.stream.name or recorded.get("stream") or defaults.stream,
        consumer_group=model.stream.consumer_group,
        stream_max_length=model.stream.max_length,
        write_db=_database(
            model.databases.write,
            model.databases.write.database or recorded.get("write") or defaults.write_db,
            "spec.databases.write",
        ),
        read_db=_database(
            model.databases.read,
            model.databases.read.database or recorded.get("read") or defaults.read_db,
            "spec.databases.read",
        ),
        redis_url=model.redis.url,
        redis_url_secret=(
            SecretKeyRef(model.redis.url_secret.name, model.redis.url_secret.key)
            if model.redis.url_secret
            else None
        ),
        deletion_policy=model.deletion_policy,
        redis_admin_secret=model.redis.admin_secret,
        database_tls=_database_tls(model.databases.tls),
        redis_ca=_ca(model.redis.ca_config_map, model.redis.ca_secret),
        role_name=check_identifier(recorded.get("role") or defaults.role, "status.databases.role"),
        adopt=model.adopt,
        uid=uid,
        write_token_secret=SecretKeyRef(token.name, token.key) if token else None,
        db_pool_min_size=model.databases.pool.min_size,
        db_pool_max_size=model.databases.pool.max_size,
        log_level=model.log_level,
        read_models=tuple(m.name for m in model.read_models),
        model_versions=tuple((m.name, m.version) for m in model.read_models),
        migration_job=model.migration_job,
        tracing=model.tracing,
        reserved=reserved_names(spec, namespace, defaults),
    )

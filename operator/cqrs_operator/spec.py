"""A CqrsStack's spec as typed values, with the defaults and derived names filled in.

The API server's schema already validates and defaults the spec; this module repeats the
defaults (so that an object created before a default existed still works) and derives what
the schema cannot: database, role and stream names from the stack's namespace and name.

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

from redis.connection import parse_url

from cqrs_stack.config import redact_url

from . import __version__

GROUP = "cqrs.dev"
VERSION = "v1alpha1"
PLURAL = "cqrsstacks"
KIND = "CqrsStack"

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# A host is a DNS name (ASCII labels of 1..63 characters, 253 in all) or an IP address: a name
# that IDNA cannot encode would fail in getaddrinfo (UnicodeError) on every reconcile.
HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$"
)
HOST_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
# Keys the operator keeps next to a stream: never a stack's stream name (see provisioning).
RESERVED_STREAM_SUFFIXES = (":dead", ":owner")
# The shape of a default database name: <readable>_<8 hex>_write|read (unique_identifier).
DEFAULT_DATABASE_SHAPE = re.compile(r"^.*_[0-9a-f]{8}_(write|read)$")
# The shape of a default stream name: <namespace>.<name>-events (a namespace holds no ".").
DEFAULT_STREAM_SHAPE = re.compile(r"^(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\..*-events$")
DELETION_POLICIES = ("Retain", "Delete")
NAME_HASH_LENGTH = 8
SYSTEM_DATABASES = ("postgres", "template0", "template1")

# (default, minimum, maximum) of every bounded integer of the spec, by its path under spec.
# The CRD states the same bounds; tests/unit/test_spec.py fails when the two disagree.
BOUNDS: dict[str, tuple[int, int, int]] = {
    "writeApi.replicas": (2, 0, 50),
    "readApi.replicas": (2, 0, 50),
    "projector.replicas": (1, 0, 50),
    "projector.batchSize": (500, 1, 100_000),
    "projector.maxDeliveries": (5, 1, 1000),
    "projector.autoscaling.minReplicas": (1, 0, 50),
    "projector.autoscaling.maxReplicas": (10, 0, 50),
    "projector.autoscaling.targetLag": (1000, 1, 10**9),
    "stream.maxLength": (1_000_000, 0, 10**12),
    "databases.write.port": (5432, 1, 65535),
    "databases.read.port": (5432, 1, 65535),
}


class SpecError(ValueError):
    """A spec the operator cannot act on; the message names the field."""


@dataclass(frozen=True)
class Resources:
    """Container resource requests and limits, as Kubernetes writes them."""

    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Autoscaling:
    """Lag-based projector scaling: replicas = ceil(lag / targetLag), within min..max."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 10
    target_lag: int = 1000


@dataclass(frozen=True)
class Component:
    """One Deployment of the stack."""

    replicas: int
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class Projector(Component):
    batch_size: int = 500
    poll_interval: float = 0.1
    max_deliveries: int = 5
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


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


# Children are named <name>-write-api, <name>-credentials...: they must stay DNS labels.
MAX_STACK_NAME = 50


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
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    log_level: str = "info"
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


def _int(section: Mapping[str, Any], key: str, path: str) -> int:
    """The integer ``spec.<path>.<key>`` within its BOUNDS, or its default when absent."""
    default, lo, hi = BOUNDS[f"{path.removeprefix('spec.')}.{key}"]
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"{path}.{key}={value!r} must be an integer in {lo}..{hi}")
    return value


def _resources(section: Mapping[str, Any]) -> Resources:
    raw = section.get("resources") or {}
    return Resources(requests=dict(raw.get("requests") or {}), limits=dict(raw.get("limits") or {}))


def check_host(host: object, field_path: str) -> str:
    """Return ``host`` if it is a DNS name or an IP address, else raise naming the field."""
    if not isinstance(host, str) or not host:
        raise SpecError(f"{field_path} is required")
    if not HOST_NAME.match(host) and not (":" in host and HOST_IPV6.match(host)):
        raise SpecError(f"{field_path}={host[:80]!r} must be a DNS name (ASCII) or an IP address")
    return host


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


def _database(raw: Mapping[str, Any], default_name: str, path: str) -> Database:
    host = check_host(raw.get("host"), f"{path}.host")
    secret = raw.get("adminSecret")
    if not isinstance(secret, str) or not DNS_SUBDOMAIN.match(secret):
        raise SpecError(f"{path}.adminSecret={secret!r} must name a Secret (DNS-1123)")
    name = raw.get("database") or default_name
    if name in SYSTEM_DATABASES:
        raise SpecError(f"{path}.database={name!r} is a system database of PostgreSQL")
    return Database(
        host=host,
        port=_int(raw, "port", path),
        admin_secret=secret,
        name=check_identifier(name, f"{path}.database"),
    )


def _projector(raw: Mapping[str, Any]) -> Projector:
    path = "spec.projector"
    auto = raw.get("autoscaling") or {}
    autoscaling = Autoscaling(
        enabled=bool(auto.get("enabled", False)),
        min_replicas=_int(auto, "minReplicas", f"{path}.autoscaling"),
        max_replicas=_int(auto, "maxReplicas", f"{path}.autoscaling"),
        target_lag=_int(auto, "targetLag", f"{path}.autoscaling"),
    )
    if autoscaling.min_replicas > autoscaling.max_replicas:
        raise SpecError(f"{path}.autoscaling.minReplicas must be <= maxReplicas")
    poll = raw.get("pollInterval", 0.1)
    if not isinstance(poll, int | float) or not 0 < poll <= 60:
        raise SpecError(f"{path}.pollInterval={poll!r} must be in (0, 60]")
    return Projector(
        replicas=_int(raw, "replicas", path),
        resources=_resources(raw),
        batch_size=_int(raw, "batchSize", path),
        poll_interval=float(poll),
        max_deliveries=_int(raw, "maxDeliveries", path),
        autoscaling=autoscaling,
    )


def _database_tls(raw: Mapping[str, Any] | None) -> DatabaseTls | None:
    if not raw:
        return None
    path = "spec.databases.tls"
    mode = raw.get("mode") or "verify-full"
    if mode not in TLS_MODES:
        raise SpecError(f"{path}.mode={mode!r} must be one of {TLS_MODES}")
    return DatabaseTls(mode, _ca_bundle(raw, path))


def _ca_bundle(raw: Mapping[str, Any], path: str) -> CaBundle | None:
    refs = [(k, raw[f"ca{k}"]) for k in ("ConfigMap", "Secret") if raw.get(f"ca{k}")]
    if len(refs) > 1:
        raise SpecError(f"{path} takes one of caConfigMap or caSecret")
    if not refs:
        return None
    kind, ref = refs[0]
    if not DNS_SUBDOMAIN.match(str(ref.get("name", ""))):
        raise SpecError(f"{path}.ca{kind}.name must name a {kind} (DNS-1123)")
    return CaBundle(kind, ref["name"], ref.get("key") or "ca.crt")


def _redis_admin(raw: Mapping[str, Any]) -> str | None:
    secret = raw.get("adminSecret") or None
    if secret is not None and not DNS_SUBDOMAIN.match(str(secret)):
        raise SpecError(f"spec.redis.adminSecret={secret!r} must name a Secret (DNS-1123)")
    return secret


def _redis(raw: Mapping[str, Any]) -> tuple[str | None, SecretKeyRef | None]:
    url = raw.get("url") or None
    ref = raw.get("urlSecret") or None
    if bool(url) == bool(ref):
        raise SpecError("spec.redis needs exactly one of url or urlSecret")
    if url and not str(url).startswith(("redis://", "rediss://")):
        shown = redact_url(str(url))  # a URL may carry a password: never echo it
        raise SpecError(f"spec.redis.url must start with redis:// or rediss://, got {shown!r}")
    if url:
        check_redis_url(str(url), "spec.redis.url")
    if ref:
        if not DNS_SUBDOMAIN.match(str(ref.get("name", ""))) or not ref.get("key"):
            raise SpecError("spec.redis.urlSecret needs a Secret name (DNS-1123) and a key")
        return None, SecretKeyRef(name=ref["name"], key=ref["key"])
    return str(url), None


def check_redis_url(url: str, field_path: str) -> str:
    """Return ``url`` if its host is a DNS name or an IP address, else raise (no password shown)."""
    try:
        parse_url(url)
        host = urlsplit(url).hostname or ""
    except ValueError as exc:  # the message may quote the URL: name the field only
        raise SpecError(f"{field_path} is not a valid Redis URL") from exc
    check_host(host, f"{field_path} host")
    return url


def _write_token(raw: Mapping[str, Any]) -> SecretKeyRef | None:
    ref = (raw.get("auth") or {}).get("tokenSecret") or None
    if ref is None:
        return None
    if not DNS_SUBDOMAIN.match(str(ref.get("name", ""))):
        raise SpecError("spec.writeApi.auth.tokenSecret.name must name a Secret (DNS-1123)")
    return SecretKeyRef(name=ref["name"], key=ref.get("key") or "token")


def recorded_names(status: Mapping[str, Any] | None) -> dict[str, str]:
    """Names the stack was provisioned with, as its status recorded them (may be empty)."""
    status = status or {}
    dbs = status.get("databases") or {}
    out = {k: dbs[k] for k in ("write", "read", "role") if isinstance(dbs.get(k), str) and dbs[k]}
    stream = (status.get("stream") or {}).get("name")
    if isinstance(stream, str) and stream:
        out["stream"] = stream
    return out


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
    image = spec.get("image") or {}
    stream = spec.get("stream") or {}
    databases = spec.get("databases") or {}
    redis_url, redis_secret = _redis(spec.get("redis") or {})
    policy = spec.get("deletionPolicy", "Retain")
    if policy not in DELETION_POLICIES:
        raise SpecError(f"spec.deletionPolicy={policy!r} must be one of {DELETION_POLICIES}")
    write_api = spec.get("writeApi") or {}
    read_api = spec.get("readApi") or {}
    defaults = default_names(namespace, name)
    recorded = recorded_names(status)
    return StackSpec(
        namespace=namespace,
        name=name,
        image_repository=image.get("repository") or "cqrs-stack",
        image_tag=str(image.get("tag") or default_tag or __version__),
        image_pull_policy=image.get("pullPolicy") or "IfNotPresent",
        write_api=Component(_int(write_api, "replicas", "spec.writeApi"), _resources(write_api)),
        read_api=Component(_int(read_api, "replicas", "spec.readApi"), _resources(read_api)),
        projector=_projector(spec.get("projector") or {}),
        stream_name=stream.get("name") or recorded.get("stream") or defaults.stream,
        consumer_group=stream.get("consumerGroup") or "projectors",
        stream_max_length=_int(stream, "maxLength", "spec.stream"),
        write_db=_database(
            databases.get("write") or {},
            recorded.get("write") or defaults.write_db,
            "spec.databases.write",
        ),
        read_db=_database(
            databases.get("read") or {},
            recorded.get("read") or defaults.read_db,
            "spec.databases.read",
        ),
        redis_url=redis_url,
        redis_url_secret=redis_secret,
        deletion_policy=policy,
        redis_admin_secret=_redis_admin(spec.get("redis") or {}),
        database_tls=_database_tls(databases.get("tls")),
        redis_ca=_ca_bundle(spec.get("redis") or {}, "spec.redis"),
        role_name=check_identifier(recorded.get("role") or defaults.role, "status.databases.role"),
        adopt=spec.get("adopt") is True,
        uid=uid,
        write_token_secret=_write_token(write_api),
        log_level=spec.get("logLevel") or "info",
        reserved=reserved_names(spec, namespace, defaults),
    )

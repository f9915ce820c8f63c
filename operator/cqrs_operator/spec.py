"""A CqrsStack's spec as typed values, with the defaults and derived names filled in.

The API server's schema already validates and defaults the spec; this module repeats the
defaults (so that an object created before a default existed still works) and derives what
the schema cannot: database, role and stream names from the stack's namespace and name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cqrs_stack.config import redact_url

from . import __version__

GROUP = "cqrs.dev"
VERSION = "v1alpha1"
PLURAL = "cqrsstacks"
KIND = "CqrsStack"

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DELETION_POLICIES = ("Retain", "Delete")


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
    write_token_secret: SecretKeyRef | None = None
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    log_level: str = "info"

    @property
    def image(self) -> str:
        return f"{self.image_repository}:{self.image_tag}"

    @property
    def role(self) -> str:
        """The per-stack PostgreSQL role that owns both databases."""
        return sql_identifier(f"cqrs_{self.namespace}_{self.name}")


def sql_identifier(text: str, suffix: str = "") -> str:
    """Turn ``text`` + ``suffix`` into a valid lower-case identifier of at most 63 bytes.

    Characters outside [a-z0-9_] become ``_``; a leading digit gets a ``_`` prefix; a name that
    is too long is cut and keeps a short hash of the full name so that it stays unique.
    """
    base = re.sub(r"[^a-z0-9_]", "_", text.lower())
    if not re.match(r"[a-z_]", base[:1]):
        base = "_" + base
    full = base + suffix
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{base[: 63 - len(suffix) - 9]}_{digest}{suffix}"


def check_identifier(value: str, field_path: str) -> str:
    """Return ``value`` if it is a safe SQL identifier, else raise naming the field."""
    if not IDENTIFIER.match(value):
        raise SpecError(f"{field_path}={value!r} must match {IDENTIFIER.pattern}")
    return value


def _int(section: Mapping[str, Any], key: str, default: int, lo: int, hi: int, path: str) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"{path}.{key}={value!r} must be an integer in {lo}..{hi}")
    return value


def _resources(section: Mapping[str, Any]) -> Resources:
    raw = section.get("resources") or {}
    return Resources(requests=dict(raw.get("requests") or {}), limits=dict(raw.get("limits") or {}))


def _database(raw: Mapping[str, Any], default_name: str, path: str) -> Database:
    host = raw.get("host")
    if not host or not isinstance(host, str):
        raise SpecError(f"{path}.host is required")
    secret = raw.get("adminSecret")
    if not isinstance(secret, str) or not DNS_SUBDOMAIN.match(secret):
        raise SpecError(f"{path}.adminSecret={secret!r} must name a Secret (DNS-1123)")
    name = raw.get("database") or default_name
    return Database(
        host=host,
        port=_int(raw, "port", 5432, 1, 65535, path),
        admin_secret=secret,
        name=check_identifier(name, f"{path}.database"),
    )


def _projector(raw: Mapping[str, Any]) -> Projector:
    path = "spec.projector"
    auto = raw.get("autoscaling") or {}
    autoscaling = Autoscaling(
        enabled=bool(auto.get("enabled", False)),
        min_replicas=_int(auto, "minReplicas", 1, 0, 50, f"{path}.autoscaling"),
        max_replicas=_int(auto, "maxReplicas", 10, 0, 50, f"{path}.autoscaling"),
        target_lag=_int(auto, "targetLag", 1000, 1, 10**9, f"{path}.autoscaling"),
    )
    if autoscaling.min_replicas > autoscaling.max_replicas:
        raise SpecError(f"{path}.autoscaling.minReplicas must be <= maxReplicas")
    poll = raw.get("pollInterval", 0.1)
    if not isinstance(poll, int | float) or not 0 < poll <= 60:
        raise SpecError(f"{path}.pollInterval={poll!r} must be in (0, 60]")
    return Projector(
        replicas=_int(raw, "replicas", 1, 0, 50, path),
        resources=_resources(raw),
        batch_size=_int(raw, "batchSize", 500, 1, 100_000, path),
        poll_interval=float(poll),
        max_deliveries=_int(raw, "maxDeliveries", 5, 1, 1000, path),
        autoscaling=autoscaling,
    )


def _redis(raw: Mapping[str, Any]) -> tuple[str | None, SecretKeyRef | None]:
    url = raw.get("url") or None
    ref = raw.get("urlSecret") or None
    if bool(url) == bool(ref):
        raise SpecError("spec.redis needs exactly one of url or urlSecret")
    if url and not str(url).startswith(("redis://", "rediss://")):
        shown = redact_url(str(url))  # a URL may carry a password: never echo it
        raise SpecError(f"spec.redis.url must start with redis:// or rediss://, got {shown!r}")
    if ref:
        if not DNS_SUBDOMAIN.match(str(ref.get("name", ""))) or not ref.get("key"):
            raise SpecError("spec.redis.urlSecret needs a Secret name (DNS-1123) and a key")
        return None, SecretKeyRef(name=ref["name"], key=ref["key"])
    return str(url), None


def _write_token(raw: Mapping[str, Any]) -> SecretKeyRef | None:
    ref = (raw.get("auth") or {}).get("tokenSecret") or None
    if ref is None:
        return None
    if not DNS_SUBDOMAIN.match(str(ref.get("name", ""))):
        raise SpecError("spec.writeApi.auth.tokenSecret.name must name a Secret (DNS-1123)")
    return SecretKeyRef(name=ref["name"], key=ref.get("key") or "token")


def parse_spec(spec: Mapping[str, Any], *, namespace: str, name: str) -> StackSpec:
    """Return the typed spec of stack ``namespace/name``; raise SpecError naming a bad field."""
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
    return StackSpec(
        namespace=namespace,
        name=name,
        image_repository=image.get("repository") or "cqrs-stack",
        image_tag=str(image.get("tag") or __version__),
        image_pull_policy=image.get("pullPolicy") or "IfNotPresent",
        write_api=Component(
            _int(write_api, "replicas", 1, 0, 50, "spec.writeApi"), _resources(write_api)
        ),
        read_api=Component(
            _int(read_api, "replicas", 1, 0, 50, "spec.readApi"), _resources(read_api)
        ),
        projector=_projector(spec.get("projector") or {}),
        stream_name=stream.get("name") or f"{name}-events",
        consumer_group=stream.get("consumerGroup") or "projectors",
        stream_max_length=_int(stream, "maxLength", 1_000_000, 0, 10**12, "spec.stream"),
        write_db=_database(
            databases.get("write") or {},
            sql_identifier(f"{namespace}_{name}", "_write"),
            "spec.databases.write",
        ),
        read_db=_database(
            databases.get("read") or {},
            sql_identifier(f"{namespace}_{name}", "_read"),
            "spec.databases.read",
        ),
        redis_url=redis_url,
        redis_url_secret=redis_secret,
        deletion_policy=policy,
        write_token_secret=_write_token(write_api),
        log_level=spec.get("logLevel") or "info",
    )

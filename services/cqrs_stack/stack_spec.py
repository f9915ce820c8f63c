"""The CqrsStack spec, defined once: typed models with a description, bounds and a default on
every field, and the API server's CEL rules attached to the models they guard.

Everything else is derived from these definitions:
- the CRD's ``openAPIV3Schema`` and the ``stack`` part of the chart's ``values.schema.json``
  and the configuration reference (``make generate``, ``cqrs_operator.schema``);
- the operator's parsing of a stack (``cqrs_operator.spec.parse_spec`` validates with them);
- the services' settings, whose bounds for the same values are the types below
  (``cqrs_stack.config.Settings``).

Field names are the spec's (camelCase aliases); the Python attributes are snake_case. The
models ignore unknown fields: the API server prunes them anyway, and an operator older than
its CRD must still read a stack.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import WithJsonSchema

# ------------------------------------------------------------------ shared bounds and names

# One bound for the spec and the services' Settings alike (config.py uses these types).
Replicas = Annotated[int, Field(ge=0, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=100_000)]
PollInterval = Annotated[float, Field(gt=0, le=60)]
MaxDeliveries = Annotated[int, Field(ge=1, le=1000)]
StreamMaxLength = Annotated[int, Field(ge=0, le=10**12)]
PoolSize = Annotated[int, Field(ge=1, le=1000)]
StreamName = Annotated[str, Field(max_length=200, pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.:-]*)?$")]
ConsumerGroup = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
]
LogLevel = Literal["debug", "info", "warning", "error"]
# The read models a stack can serve (the services read READ_MODELS, comma-separated).
ReadModel = Literal["records", "history"]
READ_MODEL_NAMES: tuple[str, ...] = ("records", "history")
# A read model's version: the one its migrations create is 1 (an int4 in the read DB).
ReadModelVersion = Annotated[int, Field(ge=1, le=2**31 - 1)]
INITIAL_READ_MODEL_VERSION = 1

DEFAULT_BATCH_SIZE = 500
DEFAULT_POLL_INTERVAL = 0.1
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_STREAM_MAX_LENGTH = 1_000_000
DEFAULT_CONSUMER_GROUP = "projectors"

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# A host is a DNS name (ASCII labels of 1..63 characters, 253 in all) or an IP address: a name
# that IDNA cannot encode would fail in getaddrinfo (UnicodeError) on every reconcile.
HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$"
)
HOST_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
# What the API server checks of a host (its regex dialect has no look-ahead for the 253 total).
HOST_SCHEMA_PATTERN = (
    r"^(([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}"
    r"[A-Za-z0-9])?)*\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$"
)
SYSTEM_DATABASES = ("postgres", "template0", "template1")
# Children are named <name>-write-api, <name>-credentials...: they must stay DNS labels.
MAX_STACK_NAME = 50

# A Kubernetes quantity ("500m", "1Gi" or a plain number), as the API server types it.
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    ),
]
# Kubernetes types the API server validates when the operator applies the Deployment; the
# CRD keeps them as given (a wrong one shows as condition WorkloadsReady=False, ApplyFailed).
KubeObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One x-kubernetes-validations entry: a CEL rule the API server enforces."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """The model_config extra that attaches CEL rules to a model's schema."""
    return {"x-kubernetes-validations": list(entries)}


class Model(BaseModel):
    """Spec models: camelCase field names, unknown fields ignored, values immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


def _default(value: Any) -> Any:
    """A field schema's ``default``: the API server fills a nested object in with it."""
    return {"default": value}


# ------------------------------------------------------------------ references


class SecretKeyRef(Model):
    """A key of a Secret in the stack's namespace."""

    name: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret name in the stack's namespace",
    )
    key: str = Field(
        min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN, description="key in that Secret"
    )


class TokenSecretRef(SecretKeyRef):
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="key in that Secret",
    )


class ConfigMapCa(Model):
    """A ConfigMap key holding a PEM CA bundle."""

    name: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="ConfigMap name in the stack's namespace",
    )
    key: str = Field(
        default="ca.crt",
        min_length=1,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="key in that ConfigMap",
    )


class SecretCa(Model):
    """A Secret key holding a PEM CA bundle."""

    name: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Secret name in the stack's namespace",
    )
    key: str = Field(
        default="ca.crt",
        min_length=1,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="key in that Secret",
    )


# ------------------------------------------------------------------ pods


class Resources(Model):
    """Container resources (requests/limits), as in a Pod."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="resource requests (cpu and memory)"
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="resource limits (cpu and memory)"
    )


class LocalObjectReference(Model):
    name: str = Field(
        max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="name in the stack's namespace"
    )


class EnvSourceRef(Model):
    name: str = Field(
        max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="name in the stack's namespace"
    )
    optional: bool = Field(default=False, description="start the pods even if it does not exist")


class EnvFromSource(Model):
    """Environment variables from every key of one ConfigMap or one opted-in Secret."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.configMapRef) != has(self.secretRef)",
                "an envFrom entry takes exactly one of configMapRef or secretRef",
            )
        )
    )

    config_map_ref: EnvSourceRef | None = Field(
        default=None, description="a ConfigMap whose keys become environment variables"
    )
    secret_ref: EnvSourceRef | None = Field(
        default=None,
        description=(
            "a Secret whose keys become environment variables; it must carry the label "
            'cqrs.dev/stack-secret: "true"'
        ),
    )
    prefix: str = Field(
        default="",
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]*$",
        description="prefix of every variable name",
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("an envFrom entry takes exactly one of configMapRef or secretRef")
        return self


class Toleration(Model):
    """A taint the pods tolerate (as in a Pod's tolerations)."""

    key: str = Field(
        default="", max_length=316, description="taint key; empty with operator Exists: every taint"
    )
    operator: Literal["Equal", "Exists"] = Field(default="Equal", description="Equal or Exists")
    value: str = Field(default="", max_length=63, description="taint value (operator Equal)")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        default="", description="taint effect; empty: every effect"
    )
    toleration_seconds: Annotated[int, Field(ge=0, le=10**9)] | None = Field(
        default=None, description="NoExecute only: seconds the pod stays bound after the taint"
    )


# Pod labels the operator (the migration Job's pods, the components' selectors) and the
# Deployment/Job controllers find pods by: a podLabels entry among them could make the
# operator take another pod for one of its own, so the spec refuses them.
RESERVED_LABEL_PREFIXES = ("cqrs.dev/", "app.kubernetes.io/", "batch.kubernetes.io/")
RESERVED_LABEL_KEYS = ("pod-template-hash", "controller-uid", "job-name")
MAX_POD_LABELS = 64
RESERVED_LABELS_SHOWN = (*(p + "*" for p in RESERVED_LABEL_PREFIXES), *RESERVED_LABEL_KEYS)
RESERVED_LABELS_RULE = (
    "self.all(k, !("
    + " || ".join(f"k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES)
    + " || k in ["
    + ", ".join(f"'{k}'" for k in RESERVED_LABEL_KEYS)
    + "]))"
)
RESERVED_LABELS_MESSAGE = (
    "podLabels may not set labels the operator or Kubernetes controllers own: "
    + ", ".join(RESERVED_LABELS_SHOWN)
)


def reserved_label(key: str) -> bool:
    """Whether pod label ``key`` is one the operator or a Kubernetes controller sets."""
    return key.startswith(RESERVED_LABEL_PREFIXES) or key in RESERVED_LABEL_KEYS


class PodControls(Model):
    """Where and how the pods of one component run (the pod template's scheduling fields)."""

    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=20,
        description="Secrets for pulling the image (a private registry)",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="labels a node must carry to run the pods"
    )
    affinity: KubeObject | None = Field(
        default=None, description="node and pod (anti-)affinity, as in a Pod"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=50, description="taints the pods tolerate"
    )
    topology_spread_constraints: list[KubeObject] | None = Field(
        default=None,
        max_length=20,
        description=(
            "how the replicas spread over topology domains, as in a Pod (labelSelector may "
            "be left out: the component's pods); unset: spread over nodes "
            "(kubernetes.io/hostname, maxSkew 1, ScheduleAnyway); [] for none"
        ),
    )
    priority_class_name: str = Field(
        default="",
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        description="PriorityClass of the pods; empty: the cluster's default",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="extra annotations on the pods"
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_POD_LABELS,  # bounds the CEL rule's cost (the API server estimates it)
        json_schema_extra=rules(cel(RESERVED_LABELS_RULE, RESERVED_LABELS_MESSAGE)),
        description=(
            "extra labels on the pods; not in the namespaces the operator and the Kubernetes "
            "controllers select pods by (" + ", ".join(RESERVED_LABELS_SHOWN) + ")"
        ),
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=20,
        description=(
            "extra environment from ConfigMaps or opted-in Secrets (the operator's own variables "
            "win)"
        ),
    )

    @field_validator("pod_labels")
    @classmethod
    def _no_reserved_labels(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if reserved_label(k))
        if reserved:
            raise ValueError(f"{RESERVED_LABELS_MESSAGE} (got {', '.join(reserved)})")
        return value


class Pods(PodControls):
    """A component's pods: scheduling plus container resources."""

    resources: Resources = Field(
        default_factory=Resources,
        description=(
            "container resources (requests/limits), as in a Pod; empty: the operator's defaults"
        ),
    )


# ------------------------------------------------------------------ components


def _min_le_max(section: str) -> dict[str, Any]:
    return rules(
        cel(
            (
                "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= "
                "self.maxReplicas"
            ),
            f"{section}.minReplicas must be <= maxReplicas",
            ".minReplicas",
        )
    )


class ApiAutoscaling(Model):
    """A HorizontalPodAutoscaler on CPU for an API; the operator then leaves replicas to it."""

    model_config = ConfigDict(json_schema_extra=_min_le_max("autoscaling"))

    enabled: bool = Field(
        default=False, description="render a HorizontalPodAutoscaler (autoscaling/v2)"
    )
    min_replicas: Annotated[int, Field(ge=1, le=50)] = Field(
        default=2, description="fewest replicas"
    )
    max_replicas: Annotated[int, Field(ge=1, le=50)] = Field(
        default=10, description="most replicas"
    )
    target_cpu_utilization: Annotated[int, Field(ge=1, le=100)] = Field(
        default=75,
        description="average CPU use, in percent of the containers' CPU request, the HPA keeps",
    )

    @field_validator("max_replicas")
    @classmethod
    def _max_not_below_min(cls, value: int, info: Any) -> int:
        if value < info.data.get("min_replicas", 0):
            raise ValueError("minReplicas must be <= maxReplicas")
        return value


class WriteAuth(Model):
    """Bearer-token authentication of writes."""

    token_secret: TokenSecretRef | None = Field(
        default=None,
        description=(
            "the Secret key holding the token (the Secret must carry the label "
            'cqrs.dev/stack-secret: "true"); writes then need "Authorization Bearer <token>"'
        ),
    )


class WriteApi(Pods):
    """The write API Deployment."""

    replicas: Replicas = Field(
        default=2, description="write-api replicas (ignored while autoscaling is enabled)"
    )
    auth: WriteAuth = Field(
        default_factory=WriteAuth,
        description="optional bearer-token authentication of writes (off by default)",
    )
    autoscaling: ApiAutoscaling = Field(
        default_factory=ApiAutoscaling, description="CPU-based scaling by a HorizontalPodAutoscaler"
    )


class ReadApi(Pods):
    """The read API Deployment."""

    replicas: Replicas = Field(
        default=2, description="read-api replicas (ignored while autoscaling is enabled)"
    )
    autoscaling: ApiAutoscaling = Field(
        default_factory=ApiAutoscaling, description="CPU-based scaling by a HorizontalPodAutoscaler"
    )


Window = Annotated[int, Field(ge=0, le=3600)]


class ProjectorAutoscaling(Model):
    """Scale the projector on stream lag, with stabilisation windows as an HPA's behavior."""

    model_config = ConfigDict(json_schema_extra=_min_le_max("spec.projector.autoscaling"))

    enabled: bool = Field(default=False, description="turn lag-based scaling on")
    engine: Literal["builtin", "keda"] = Field(
        default="builtin",
        description=(
            "builtin: the operator sets replicas = ceil(lag / targetLag) within the windows; "
            "keda: a KEDA ScaledObject (redis-streams trigger) scales it (KEDA must be installed)"
        ),
    )
    min_replicas: Replicas = Field(default=1, description="fewest projector replicas")
    max_replicas: Replicas = Field(default=10, description="most projector replicas")
    target_lag: Annotated[int, Field(ge=1, le=10**9)] = Field(
        default=1000, description="pending events one replica is expected to keep up with"
    )
    scale_up_window_seconds: Window = Field(
        default=30,
        description=(
            "a scale-up takes the lowest replica count wanted over this many seconds (a shorter "
            "lag spike scales nothing)"
        ),
    )
    scale_down_window_seconds: Window = Field(
        default=300,
        description="a scale-down takes the highest replica count wanted over this many seconds",
    )

    @field_validator("max_replicas")
    @classmethod
    def _max_not_below_min(cls, value: int, info: Any) -> int:
        if value < info.data.get("min_replicas", 0):
            raise ValueError("minReplicas must be <= maxReplicas")
        return value


class Projector(Pods):
    """The projector Deployment (stream to read DB)."""

    replicas: Replicas = Field(
        default=1, description="projector replicas (ignored while autoscaling is enabled)"
    )
    batch_size: BatchSize = Field(
        default=DEFAULT_BATCH_SIZE,
        description="stream entries per read and per read-DB transaction",
    )
    poll_interval: PollInterval = Field(
        default=DEFAULT_POLL_INTERVAL,
        description="seconds a projector blocks waiting for new entries",
    )
    max_deliveries: MaxDeliveries = Field(
        default=DEFAULT_MAX_DELIVERIES,
        description="deliveries before an entry goes to the dead-letter stream",
    )
    autoscaling: ProjectorAutoscaling | None = Field(
        default=None, description="scale the projector on stream lag"
    )


class MigrationJob(PodControls):
    """The Job that migrates the stack's databases with its own image."""

    resources: Resources = Field(
        default_factory=Resources,
        description=(
            "container resources (requests/limits), as in a Pod; empty: the operator's defaults"
        ),
    )


class ReadModelSpec(Model):
    """One read model the stack keeps, and the version of it that should be live."""

    name: ReadModel = Field(description="records (GET /read/{key}) or history")
    version: ReadModelVersion = Field(
        default=INITIAL_READ_MODEL_VERSION,
        description=(
            "the model's version; above the live one (status.readModels), the operator runs "
            "a rebuild Job of the stack's image that builds it beside the live one and swaps "
            "it in (annotation cqrs.dev/rebuild: a new value rebuilds every model at its "
            "version)"
        ),
    )


# ------------------------------------------------------------------ stream, databases, Redis


class Image(Model):
    """The services' image (write-api, read-api, projector, migrate)."""

    repository: str = Field(
        default="cqrs-stack", min_length=1, max_length=255, description="image repository"
    )
    # No default: a stack that does not pin a tag runs the operator's own version.
    tag: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
        description="image tag; unset: the operator's version (moves with operator upgrades)",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="the containers' imagePullPolicy"
    )


class Stream(Model):
    """The Redis stream the write API publishes to and the projectors read."""

    name: StreamName = Field(
        default="",
        description=(
            "Redis stream (immutable once provisioned); empty means <namespace>.<stack name>-events"
        ),
    )
    consumer_group: ConsumerGroup = Field(
        default=DEFAULT_CONSUMER_GROUP,
        description="the projectors' consumer group (immutable once provisioned)",
    )
    max_length: StreamMaxLength = Field(
        default=DEFAULT_STREAM_MAX_LENGTH,
        description="approximate stream length cap; 0 never trims",
    )


def check_host(host: str) -> str:
    """``host`` if it is a DNS name (ASCII) or an IP address, else ValueError."""
    if not HOST_NAME.match(host) and not (":" in host and HOST_IPV6.match(host)):
        raise ValueError("must be a DNS name (ASCII) or an IP address")
    return host


class Database(Model):
    """One PostgreSQL database of the stack (host, port and database are immutable once provisioned)."""  # noqa: E501

    host: str = Field(
        min_length=1,
        max_length=253,
        json_schema_extra={"pattern": HOST_SCHEMA_PATTERN},
        description=(
            "PostgreSQL host: a DNS name (ASCII labels of at most 63 characters) or an IP address"
        ),
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=5432, description="PostgreSQL port")
    admin_secret: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description=(
            "Secret in the stack's namespace with keys username and password of a PostgreSQL role"
            " that may create roles and databases; it must carry the label "
            'cqrs.dev/admin-credentials: "true" (and may restrict hosts with the annotation '
            "cqrs.dev/admin-hosts)"
        ),
    )
    database: str | None = Field(
        default=None,
        pattern=IDENTIFIER.pattern,
        json_schema_extra=rules(
            cel(
                "!(self in ['postgres', 'template0', 'template1'])",
                "a system database of PostgreSQL cannot be a stack's database",
            )
        ),
        description="database name; empty means <namespace>_<name>_<hash>_write / _read",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("database")
    @classmethod
    def _not_a_system_database(cls, value: str | None) -> str | None:
        if value in SYSTEM_DATABASES:
            raise ValueError(f"{value!r} is a system database of PostgreSQL")
        return value


class DatabaseTls(Model):
    """TLS to both PostgreSQL servers."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!(has(self.caConfigMap) && has(self.caSecret))",
                "spec.databases.tls takes one of caConfigMap or caSecret",
            )
        )
    )

    mode: Literal["disable", "require", "verify-ca", "verify-full"] = Field(
        default="verify-full",
        description=(
            "libpq's sslmode: verify-full checks the CA and the host name, verify-ca the CA only, "
            "require encrypts without checking"
        ),
    )
    ca_config_map: ConfigMapCa | None = Field(
        default=None,
        description=(
            "a ConfigMap key holding the PEM CA bundle (mounted into the pods as PGSSLROOTCERT)"
        ),
    )
    ca_secret: SecretCa | None = Field(
        default=None,
        description=(
            "a Secret key holding the PEM CA bundle; the Secret must carry the label "
            'cqrs.dev/stack-secret: "true"'
        ),
    )

    @model_validator(mode="after")
    def _one_ca(self) -> DatabaseTls:
        if self.ca_config_map is not None and self.ca_secret is not None:
            raise ValueError("takes one of caConfigMap or caSecret")
        return self


class Pool(Model):
    """Each pod's connection pool to each database (DB_POOL_MIN_SIZE / DB_POOL_MAX_SIZE)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.minSize) || !has(self.maxSize) || self.minSize <= self.maxSize",
                "spec.databases.pool.minSize must be <= maxSize",
                ".minSize",
            )
        )
    )

    # Smaller than a single machine's defaults: replicas x pools share the servers' connections.
    min_size: PoolSize = Field(
        default=1, description="connections each pod keeps open to each database"
    )
    max_size: PoolSize = Field(
        default=10, description="most connections each pod opens to each database"
    )

    @field_validator("max_size")
    @classmethod
    def _max_not_below_min(cls, value: int, info: Any) -> int:
        if value < info.data.get("min_size", 0):
            raise ValueError("minSize must be <= maxSize")
        return value


class Databases(Model):
    """Where the write DB and the read DB live."""

    write: Database = Field(
        description=(
            "the write DB (the commands: the source of truth); host, port and database are "
            "immutable once provisioned"
        )
    )
    read: Database = Field(
        description=(
            "the read DB (the read models); host, port and database are immutable once provisioned"
        )
    )
    tls: DatabaseTls | None = Field(
        default=None,
        description=(
            "TLS to both PostgreSQL servers, for the operator and the pods (recommended: mode "
            "verify-full with the servers' CA); unset means libpq's default, prefer (TLS when "
            "offered, unverified)"
        ),
    )
    pool: Pool = Field(
        default_factory=Pool,
        json_schema_extra=_default({}),
        description="each pod's connection pools",
    )


class Redis(Model):
    """Exactly one of url or urlSecret."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.url) != has(self.urlSecret)",
                "spec.redis needs exactly one of url or urlSecret",
            )
        )
    )

    url: str | None = Field(
        default=None,
        pattern=r"^rediss?://.+",
        description="redis:// or rediss:// URL without a password",
    )
    admin_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description=(
            "optional Secret with the Redis admin login (keys password and optionally username), "
            'labelled cqrs.dev/admin-credentials: "true"; with it the pods log in as a Redis ACL '
            "user of their own, limited to the stack's stream (condition RedisIsolation)"
        ),
    )
    url_secret: SecretKeyRef | None = Field(
        default=None,
        description=(
            "a Secret key holding the Redis URL (for URLs with a password); the Secret must carry "
            'the label cqrs.dev/stack-secret: "true"'
        ),
    )
    ca_config_map: ConfigMapCa | None = Field(
        default=None,
        description=(
            "a ConfigMap key holding the PEM CA bundle of a rediss:// server (the operator "
            "verifies by it; the pods get it mounted)"
        ),
    )
    ca_secret: SecretCa | None = Field(
        default=None,
        description=(
            "a Secret key holding the PEM CA bundle of a rediss:// server; the Secret must carry "
            'the label cqrs.dev/stack-secret: "true"'
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> Redis:
        if (self.url is None) == (self.url_secret is None):
            raise ValueError("needs exactly one of url or urlSecret")
        if self.ca_config_map is not None and self.ca_secret is not None:
            raise ValueError("takes one of caConfigMap or caSecret")
        return self


# ------------------------------------------------------------------ tracing

# An OTLP/HTTP collector's base URL: http(s), a host, no login (headers carry credentials).
# Explicit ASCII classes of RFC 3986's characters only, so that the API server (RE2) and the
# operator (Python) read it alike (``\s`` differs between them); no ``$`` anywhere (the kubelet
# would expand ``$(WRITE_DB_URL)`` in the pod's env), no ``@`` before the path (a login), no
# ``?`` or ``#`` (a query, a fragment); ``%`` only as a percent-escape. Checked with
# ``fullmatch`` in Python, whose ``$`` also matches before a trailing newline.
_URL_UNRESERVED = r"A-Za-z0-9._~!&'()*+,;="  # unreserved and sub-delims but ``$`` (and -)
_URL_ESCAPE = "%[0-9A-Fa-f]{2}"
OTLP_ENDPOINT_PATTERN = (
    rf"^https?://(\[[0-9A-Fa-f:.]+\]|([{_URL_UNRESERVED}-]|{_URL_ESCAPE})+)(:[0-9]{{1,5}})?"
    rf"(/([{_URL_UNRESERVED}:@-]|{_URL_ESCAPE})*)*$"
)
SampleRatio = Annotated[float, Field(ge=0, le=1)]


class Tracing(Model):
    """OpenTelemetry traces of the write API, read API and projector (the services' TRACING)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.enabled) || !self.enabled || has(self.endpoint)",
                "spec.tracing.endpoint is required when tracing is enabled",
                ".endpoint",
            )
        )
    )

    enabled: bool = Field(
        default=False,
        description=(
            "trace each write from its request through commit and publish to its projection "
            "(TRACING=true in the write-api, read-api and projector pods); off: no span is made"
        ),
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        json_schema_extra={"pattern": OTLP_ENDPOINT_PATTERN},
        description=(
            "the OTLP/HTTP collector's base URL, e.g. http://otel-collector.observability:4318 "
            "(OTEL_EXPORTER_OTLP_ENDPOINT; spans go to <endpoint>/v1/traces); required when "
            "enabled; no login in it: credentials go in OTEL_EXPORTER_OTLP_HEADERS, from an "
            "envFrom Secret"
        ),
    )
    sample_ratio: SampleRatio = Field(
        default=1.0,
        description=(
            "the share of traces begun in the stack that are recorded, 0 to 1 "
            "(OTEL_TRACES_SAMPLER=parentbased_traceidratio); a request with a traceparent "
            "header keeps its caller's decision"
        ),
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(OTLP_ENDPOINT_PATTERN, value):
            raise ValueError(
                "must be an http:// or https:// URL of the collector, with a host and without "
                "a login (user:password@), a query or a fragment"
            )
        return value

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> Tracing:
        if self.enabled and self.endpoint is None:
            raise ValueError("endpoint is required when tracing is enabled")
        return self


# ------------------------------------------------------------------ the spec

_IDENTITY = (
    "!has(oldSelf.status) || !has(oldSelf.status.databases) || ("
    "self.spec.databases.{k}.host == oldSelf.spec.databases.{k}.host && "
    "self.spec.databases.{k}.port == oldSelf.spec.databases.{k}.port && "
    "has(self.spec.databases.{k}.database) == has(oldSelf.spec.databases.{k}.database) && "
    "(!has(self.spec.databases.{k}.database) || "
    "self.spec.databases.{k}.database == oldSelf.spec.databases.{k}.database))"
)

# The rules on the whole object: they compare with oldSelf.status (set once provisioned).
ROOT_RULES: list[dict[str, str]] = [
    cel(
        f"self.metadata.name.size() <= {MAX_STACK_NAME}",
        (
            f"metadata.name must be at most {MAX_STACK_NAME} characters (child objects are named "
            f"<name>-write-api)"
        ),
    ),
    *(
        cel(
            _IDENTITY.format(k=k),
            (
                f"spec.databases.{k} host, port and database are immutable once provisioned (a "
                f"change would orphan the data); to move a stack, create a new CqrsStack and copy "
                f"the data (pg_dump/pg_restore)"
            ),
            f".spec.databases.{k}",
        )
        for k in ("write", "read")
    ),
    cel(
        (
            "!has(oldSelf.status) || !has(oldSelf.status.stream) || (self.spec.stream.name == "
            "oldSelf.spec.stream.name && self.spec.stream.consumerGroup == "
            "oldSelf.spec.stream.consumerGroup)"
        ),
        (
            "spec.stream name and consumerGroup are immutable once provisioned (a change would "
            "orphan the stream); to move a stack, create a new CqrsStack (its read model is "
            "rebuilt from the write DB)"
        ),
        ".spec.stream",
    ),
    # The stream lives at the URL (host, port and logical database): a change orphans it.
    cel(
        (
            "!has(oldSelf.status) || !has(oldSelf.status.stream) || (has(self.spec.redis.url) == "
            "has(oldSelf.spec.redis.url) && (!has(self.spec.redis.url) || self.spec.redis.url == "
            "oldSelf.spec.redis.url))"
        ),
        (
            "spec.redis.url is immutable once provisioned (a change would orphan the stream); to "
            "move a stack, create a new CqrsStack"
        ),
        ".spec.redis",
    ),
]


class CqrsStackSpec(Model):
    """The desired stack. Database names and hosts, the stream name and the consumer group are immutable once set."""  # noqa: E501

    adopt: bool = Field(
        default=False,
        description=(
            "Use existing databases, role or stream that carry no CqrsStack owner marker (they are"
            " marked as adopted and never dropped by this stack). Objects of another stack are "
            "never adopted."
        ),
    )
    image: Image = Field(
        default_factory=Image,
        json_schema_extra=_default({}),
        description="The services' image (write-api, read-api, projector, migrate)",
    )
    write_api: WriteApi = Field(
        default_factory=WriteApi,
        json_schema_extra=_default({}),
        description="The write API Deployment",
    )
    read_api: ReadApi = Field(
        default_factory=ReadApi,
        json_schema_extra=_default({}),
        description="The read API Deployment",
    )
    projector: Projector = Field(
        default_factory=Projector,
        json_schema_extra=_default({}),
        description="The projector Deployment (stream to read DB)",
    )
    migration_job: MigrationJob = Field(
        default_factory=MigrationJob,
        json_schema_extra=_default({}),
        description="The Job that migrates the databases with the stack's image",
    )
    read_models: list[ReadModelSpec] = Field(
        default_factory=lambda: [ReadModelSpec(name="records")],
        min_length=1,
        max_length=len(READ_MODEL_NAMES),
        json_schema_extra={
            "default": [{"name": "records", "version": INITIAL_READ_MODEL_VERSION}],
            # The API server refuses a name given twice (and merges entries by name).
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
        description=(
            "the read models the projector keeps and the read API serves (READ_MODELS, the "
            "names): records (GET /read/{key}), history (GET /read/{key}/history); a version "
            "above the live one makes the operator rebuild that model beside the live one"
        ),
    )
    stream: Stream = Field(
        default_factory=Stream,
        json_schema_extra=_default({}),
        description="The Redis stream the write API publishes to and the projectors read",
    )
    databases: Databases = Field(description="Where the write DB and the read DB live")
    redis: Redis = Field(description="exactly one of url or urlSecret")
    log_level: LogLevel = Field(default="info", description="the services' log level")
    tracing: Tracing = Field(
        default_factory=Tracing,
        json_schema_extra=_default({}),
        description="OpenTelemetry traces of the services, sent to an OTLP/HTTP collector",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description=(
            "Delete drops the databases, the role and the stream this stack created (never adopted"
            " ones or another stack's); Retain keeps them"
        ),
    )

    @field_validator("read_models")
    @classmethod
    def _distinct(cls, value: list[ReadModelSpec]) -> list[ReadModelSpec]:
        names = [model.name for model in value]
        if len(set(names)) != len(names):
            raise ValueError("names a read model twice")
        return value


# ------------------------------------------------------------------ status (the operator writes it)


class Condition(Model):
    """One condition."""

    type: str = Field(description="condition type")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str | None = Field(default=None, description="one CamelCase word for machines and grep")
    message: str | None = Field(default=None, description="what a person needs to know")
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="when status last changed",
    )
    observed_generation: int | None = Field(
        default=None,
        json_schema_extra={"format": "int64"},
        description="the generation this condition is about",
    )


class ScaleSample(Model):
    """One replica count the lag asked for, and when."""

    time: float = Field(description="seconds since the epoch")
    replicas: int = Field(description="replicas ceil(lag / targetLag) asked for, within min..max")


class OldestPending(Model):
    """The oldest stream entry delivered and not acknowledged."""

    id: str = Field(description="stream entry id")
    age_seconds: float = Field(description="seconds since the entry was added")
    consumer: str = Field(description="the consumer holding it")
    deliveries: int = Field(description="times it was delivered")


class PinningTransaction(Model):
    """A write-DB transaction the sweep passed while open, still open."""

    xid: str = Field(description="its transaction id (xid8)")
    pid: int | None = Field(default=None, description="its backend's pid (None: another role's)")
    application_name: str | None = Field(default=None, description="its application_name")
    state: str | None = Field(default=None, description="e.g. idle in transaction")
    open_seconds: float | None = Field(default=None, description="seconds since it began")


class CatchUpStatus(Model):
    """The catch-up sweep's watermark and what pins it."""

    watermark: str | None = Field(default=None, description="lowest watermark over the models")
    age_seconds: float | None = Field(
        default=None,
        description="the longer of the time since the last sweep and the oldest pin's age",
    )
    pinned_by: list[PinningTransaction] | None = Field(
        default=None, description="write-DB transactions pinning the watermark, oldest first"
    )


class ProjectionHealth(Model):
    """Why the projection is behind, as the operator last read the consumer group."""

    catch_up: CatchUpStatus | None = Field(
        default=None, description="the catch-up sweep (when the databases answered)"
    )

    verdict: Literal["ok", "degraded", "stalled", "unknown"] = Field(
        description="ok, degraded (progress, but lag over the target), stalled (no progress"
        " while there is work) or unknown (the stream could not be read)"
    )
    reason: str = Field(description="the cause, in words")
    lag_events: int | None = Field(
        default=None,
        json_schema_extra={"format": "int64"},
        description="entries not acknowledged by the group: undelivered plus pending",
    )
    lag_seconds: float | None = Field(
        default=None, description="age of the oldest entry not acknowledged"
    )
    oldest_pending: OldestPending | None = Field(
        default=None, description="the oldest entry delivered and not acknowledged"
    )
    consumers: int | None = Field(default=None, description="consumers of the group")
    stopped_consumers: list[str] | None = Field(
        default=None, description="consumers idle past the bound while holding pending entries"
    )


class ProjectionProgress(Model):
    """The last reading that moved: two readings over time tell "no progress"."""

    marker: str = Field(description="changes whenever the group delivers or acknowledges")
    since: float = Field(description="seconds since the epoch when the marker was first seen")


class ProjectorStatus(Model):
    """The projector's replicas and lag."""

    replicas: int | None = Field(default=None, description="projector replicas applied")
    lag: int | None = Field(
        default=None, json_schema_extra={"format": "int64"}, description="events not yet projected"
    )
    recommendations: list[ScaleSample] | None = Field(
        default=None,
        description="the builtin scaler's recent replica counts (its stabilisation windows)",
    )
    health: ProjectionHealth | None = Field(
        default=None, description="why the projection is behind (ProjectionStalled/Degraded)"
    )
    progress: ProjectionProgress | None = Field(
        default=None, description="since when the consumer group has not moved"
    )


class SchemaVersions(Model):
    write: int | None = Field(default=None, description="write database schema version")
    read: int | None = Field(default=None, description="read database schema version")


class ExpectedSchemaVersions(Model):
    write: int | None = Field(
        default=None, description="write database schema version the image expects"
    )
    read: int | None = Field(
        default=None, description="read database schema version the image expects"
    )


class DatabasesStatus(Model):
    """The names the stack was provisioned with (kept across upgrades)."""

    write: str | None = Field(default=None, description="write database")
    read: str | None = Field(default=None, description="read database")
    role: str | None = Field(default=None, description="the stack's PostgreSQL role")
    schema_versions: SchemaVersions | None = Field(
        default=None, description="migration version of each database"
    )
    expected_schema_versions: ExpectedSchemaVersions | None = Field(
        default=None,
        description=(
            "the schema versions that migratedImage expects (from its migration Job's report)"
        ),
    )
    migrated_image: str | None = Field(
        default=None,
        description=(
            "the image whose migration Job last succeeded; the Deployments run it until the "
            "spec's image is migrated"
        ),
    )


class StreamStatus(Model):
    """The stream the stack was provisioned with."""

    name: str | None = Field(default=None, description="stream name")
    consumer_group: str | None = Field(default=None, description="consumer group")


class ReadModelRun(Model):
    """The last rebuild Job the operator ran for one read model."""

    job: str | None = Field(default=None, description="the Job (and the rebuild's run id)")
    version: int | None = Field(default=None, description="the version it built")
    request: str | None = Field(
        default=None,
        description="the cqrs.dev/rebuild value it ran for; empty: a version above the live one",
    )
    outcome: str | None = Field(
        default=None, description="Running, Swapped, Failed, Cancelled or RolledBack"
    )


class ReadModelStatus(Model):
    """One read model as the read DB records it."""

    name: str = Field(description="the read model")
    version: int | None = Field(default=None, description="the version live (serving reads)")
    last_run: ReadModelRun | None = Field(
        default=None,
        description=(
            "the model's last rebuild Job: a Failed or Cancelled one is not run again until "
            "the version or the cqrs.dev/rebuild annotation changes"
        ),
    )


class RebuildStatus(Model):
    """The rebuild Job running, or the last one, with its progress from the read DB."""

    models: list[str] | None = Field(default=None, description="the read models it rebuilds")
    version: int | None = Field(default=None, description="the version it builds")
    job: str | None = Field(default=None, description="the Job (and the rebuild's run id)")
    phase: str | None = Field(
        default=None,
        description=(
            "pending (no progress recorded yet), load, catch-up, verify, swap; at the end done, "
            "failed, cancelled or rolled-back"
        ),
    )
    outcome: str | None = Field(
        default=None, description="Running, Swapped, Failed, Cancelled or RolledBack"
    )
    done: int | None = Field(
        default=None, json_schema_extra={"format": "int64"}, description="commands done"
    )
    total: int | None = Field(
        default=None,
        json_schema_extra={"format": "int64"},
        description="commands to do (as far as known)",
    )
    percent: float | None = Field(default=None, description="done of total, 0 to 100")
    commands_per_second: float | None = Field(
        default=None, description="commands per second so far"
    )
    eta_seconds: float | None = Field(
        default=None, description="seconds left at that rate (absent while unknown)"
    )
    started_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="when it started"
    )
    finished_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="when it ended"
    )
    message: str | None = Field(default=None, description="what a person needs to know")


class CqrsStackStatus(Model):
    """What the operator observed (written by the operator only)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    phase: str | None = Field(
        default=None,
        description=(
            "Provisioning, Ready, Degraded (transient trouble), Failed (needs a change) or Deleting"
        ),
    )
    observed_generation: int | None = Field(
        default=None,
        json_schema_extra={"format": "int64"},
        description="the generation of the spec last reconciled",
    )
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="DatabasesReady, StreamReady, WorkloadsReady, WorkloadsAvailable and Ready",
    )
    projector: ProjectorStatus | None = Field(
        default=None, description="the projector's replicas and lag"
    )
    databases: DatabasesStatus | None = Field(
        default=None, description="the names the stack was provisioned with (kept across upgrades)"
    )
    stream: StreamStatus | None = Field(
        default=None, description="the stream the stack was provisioned with"
    )
    read_models: list[ReadModelStatus] | None = Field(
        default=None, description="each read model's live version and last rebuild Job"
    )
    rebuild: RebuildStatus | None = Field(
        default=None, description="the rebuild running, or the last one"
    )
    rebuild_request: str | None = Field(
        default=None,
        description="the last value of the annotation cqrs.dev/rebuild whose rebuilds were run",
    )

"""Pure rendering: a stack's spec in, its Kubernetes objects out (plain dicts, no I/O).

Names of the children: ``<stack>-config`` (ConfigMap), ``<stack>-credentials`` (Secret),
``<stack>-write-api`` / ``<stack>-read-api`` (Deployment + Service), ``<stack>-projector``
(Deployment). Owner references are added by the caller (``kopf.adopt``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from cqrs_stack.stack_spec import ApiAutoscaling, PodControls

from . import scaling
from .spec import CaBundle, Component, StackSpec

PORT = 8000
RUN_AS = 10001
CONFIG_HASH_ANNOTATION = "cqrs.dev/config-hash"
MANAGED_BY = "cqrs-stack-operator"
COMPONENTS = ("write-api", "read-api", "projector")
# Settings that only one component reads: a change of them rolls that component alone (a
# projector batch size never restarts the APIs). Every other key is read by all.
COMPONENT_ONLY_KEYS: Mapping[str, str] = {
    "PROJECTOR_BATCH_SIZE": "projector",
    "PROJECTOR_MAX_DELIVERIES": "projector",
}
MIGRATE = "migrate"
IMAGE_ANNOTATION = "cqrs.dev/image"
# The migration Job's bounds: a few retries, ten minutes in all, removed an hour after it
# finished (the operator records its outcome in the stack's status long before).
MIGRATION_BACKOFF_LIMIT = 2
MIGRATION_DEADLINE_SECONDS = 600
MIGRATION_TTL_SECONDS = 3600
# Where the Job's container writes its report: the kubelet makes it the container's
# termination message, which the operator reads from the pod's status.
MIGRATION_REPORT_PATH = "/dev/termination-log"
SERVED_COMPONENTS = ("write-api", "read-api")
SECRET_URL_KEYS = ("WRITE_DB_URL", "READ_DB_URL", "REDIS_URL")
# The default spread of every component's replicas: over nodes, as a preference (a cluster of
# one node still runs every replica).
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
KEDA_API = "keda.sh/v1alpha1"
# Keys of the credentials Secret that KEDA's TriggerAuthentication reads (engine keda only).
KEDA_REDIS_KEYS = ("REDIS_USERNAME", "REDIS_PASSWORD")
POSTGRES_CA_DIR = "/etc/cqrs-stack/postgresql-ca"
REDIS_CA_DIR = "/etc/cqrs-stack/redis-ca"
# The pod's own name (downward API), for the traces' k8s.pod.name (spec.tracing).
TRACING_POD_NAME = "CQRS_POD_NAME"

Manifest = dict[str, Any]


def child_name(spec: StackSpec, suffix: str) -> str:
    return f"{spec.name}-{suffix}"


def selector_labels(spec: StackSpec, component: str) -> dict[str, str]:
    """The immutable labels a Deployment selects its pods by."""
    return {
        "app.kubernetes.io/name": "cqrs-stack",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
    }


def labels(spec: StackSpec, component: str) -> dict[str, str]:
    return {
        **selector_labels(spec, component),
        "app.kubernetes.io/part-of": "cqrs-stack",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": spec.image_tag[:63],
    }


def _metadata(spec: StackSpec, suffix: str, component: str) -> dict[str, Any]:
    return {
        "name": child_name(spec, suffix),
        "namespace": spec.namespace,
        "labels": labels(spec, component),
    }


def config_data(spec: StackSpec) -> dict[str, str]:
    """The non-secret settings every component reads (names of cqrs_stack.config.Settings)."""
    return {
        "EVENT_STREAM_NAME": spec.stream_name,
        "CONSUMER_GROUP": spec.consumer_group,
        "STREAM_MAX_LENGTH": str(spec.stream_max_length),
        "PROJECTOR_BATCH_SIZE": str(spec.projector.batch_size),
        "PROJECTOR_POLL_INTERVAL": str(spec.projector.poll_interval),
        "PROJECTOR_MAX_DELIVERIES": str(spec.projector.max_deliveries),
        "DB_POOL_MIN_SIZE": str(spec.db_pool_min_size),
        "DB_POOL_MAX_SIZE": str(spec.db_pool_max_size),
        "LOG_LEVEL": spec.log_level,
        "READ_MODELS": ",".join(spec.read_models),
    }


def config_map(spec: StackSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, "config", "config"),
        "data": config_data(spec),
    }


def database_url(host: str, port: int, database: str, user: str, password: str) -> str:
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def credentials_data(
    spec: StackSpec, password: str, redis_url: str, login: str | None = None
) -> dict[str, str]:
    """The secret settings: the login (the stack's role or its second login slot, see
    rotation.py), its password and the URLs built with them."""
    user = login or spec.role
    return {
        "username": user,
        "password": password,
        "WRITE_DB_URL": database_url(
            spec.write_db.host, spec.write_db.port, spec.write_db.name, user, password
        ),
        "READ_DB_URL": database_url(
            spec.read_db.host, spec.read_db.port, spec.read_db.name, user, password
        ),
        "REDIS_URL": redis_url,
        **(keda_redis_login(redis_url) if uses_keda(spec) else {}),
    }


def uses_keda(spec: StackSpec) -> bool:
    auto = spec.projector.autoscaling
    return auto.enabled and auto.engine == "keda"


def keda_redis_login(redis_url: str) -> dict[str, str]:
    """The Redis login of the pods' URL as separate keys, for KEDA's TriggerAuthentication."""
    parts = urlsplit(redis_url)
    out = {}
    if parts.username:
        out["REDIS_USERNAME"] = unquote(parts.username)
    if parts.password:
        out["REDIS_PASSWORD"] = unquote(parts.password)
    return out


def credentials_secret(
    spec: StackSpec, password: str, redis_url: str, login: str | None = None
) -> Manifest:
    data = credentials_data(spec, password, redis_url, login)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(spec, "credentials", "credentials"),
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def config_hash(config: Mapping[str, str], secret: Mapping[str, str], sources: str = "") -> str:
    """A digest of everything the pods read at start: a change of it rolls the Deployments.

    ``sources``: the digest of the other Secrets and ConfigMaps they read (``sources_digest``);
    left out of the blob when empty, so that a stack that reads none keeps its hash."""
    parts: dict[str, Any] = {"config": dict(config), "secret": dict(secret)}
    if sources:
        parts["sources"] = sources
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pod_sources(template: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every Secret and ConfigMap a pod template reads, as (kind, name): secret, configMap
    and projected volumes, envFrom and env of every container."""
    pod = template.get("spec") or {}
    out: set[tuple[str, str]] = set()
    for volume in pod.get("volumes") or []:
        if "secret" in volume:
            out.add(("Secret", volume["secret"].get("secretName", "")))
        if "configMap" in volume:
            out.add(("ConfigMap", volume["configMap"].get("name", "")))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                out.add(("Secret", source["secret"].get("name", "")))
            if "configMap" in source:
                out.add(("ConfigMap", source["configMap"].get("name", "")))
    for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        for ref in container.get("envFrom") or []:
            if "secretRef" in ref:
                out.add(("Secret", ref["secretRef"].get("name", "")))
            if "configMapRef" in ref:
                out.add(("ConfigMap", ref["configMapRef"].get("name", "")))
        for env in container.get("env") or []:
            value_from = env.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                out.add(("Secret", value_from["secretKeyRef"].get("name", "")))
            if "configMapKeyRef" in value_from:
                out.add(("ConfigMap", value_from["configMapKeyRef"].get("name", "")))
    return out


def external_sources(spec: StackSpec, template: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The Secrets and ConfigMaps a pod template reads besides the stack's own ConfigMap and
    credentials Secret (whose wanted content the config hash covers already), sorted."""
    own = {("ConfigMap", child_name(spec, "config")), ("Secret", child_name(spec, "credentials"))}
    return sorted(pod_sources(template) - own)


def sources_digest(digests: Mapping[tuple[str, str], str]) -> str:
    """One digest of the per-source digests ((kind, name) -> digest of its data) a component
    reads: never the data itself, so no Secret value reaches an annotation."""
    blob = json.dumps(sorted([kind, name, d] for (kind, name), d in digests.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16] if digests else ""


def component_config(config: Mapping[str, str], component: str) -> dict[str, str]:
    """The part of the ConfigMap that ``component`` reads (COMPONENT_ONLY_KEYS of others out)."""
    return {k: v for k, v in config.items() if COMPONENT_ONLY_KEYS.get(k, component) == component}


def component_hashes(
    config: Mapping[str, str],
    secret: Mapping[str, str],
    sources: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The config hash of each Deployment, from what that component reads only.

    ``sources``: per component, the ``sources_digest`` of the other Secrets and ConfigMaps its
    pods read (write token, envFrom, CA bundles): a new value in one of them rolls the
    components that read it, and those alone."""
    extra = sources or {}
    return {
        c: config_hash(component_config(config, c), secret, extra.get(c, "")) for c in COMPONENTS
    }


def _resources(component: Component) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if component.resources.requests:
        out["requests"] = dict(component.resources.requests)
    if component.resources.limits:
        out["limits"] = dict(component.resources.limits)
    return out or {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def _env(spec: StackSpec, component: str, secret: str) -> list[dict[str, Any]]:
    """Credentials from Secrets only (never the ConfigMap); the write token where it applies."""
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for key in SECRET_URL_KEYS
    ]
    tls = spec.database_tls
    if tls is not None:  # libpq's variables, which asyncpg follows in the services
        env.append({"name": "PGSSLMODE", "value": tls.mode})
        if tls.ca is not None:
            env.append({"name": "PGSSLROOTCERT", "value": f"{POSTGRES_CA_DIR}/{tls.ca.key}"})
    token = spec.write_token_secret
    if token is not None and component == "write-api":
        ref = {"name": token.name, "key": token.key}
        env.append({"name": "WRITE_API_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return env + tracing_env(spec, component)


def tracing_env(spec: StackSpec, component: str) -> list[dict[str, Any]]:
    """spec.tracing as the services read it (TRACING and the SDK's OTEL_* variables); none
    at all while it is off, so that turning it off takes them out of the pods.

    Each workload is a service of its own, named as its Deployment, in a service namespace
    named as the stack's namespace; the pod's name comes from the downward API.
    """
    tracing = spec.tracing
    if not tracing.enabled or tracing.endpoint is None:
        return []
    workload = child_name(spec, component)
    resource = {
        "service.namespace": spec.namespace,
        "service.version": spec.image_tag,
        "k8s.namespace.name": spec.namespace,
        "k8s.deployment.name": workload,
        "k8s.pod.name": f"$({TRACING_POD_NAME})",  # expanded by the kubelet
    }
    values = {
        "TRACING": "true",
        "OTEL_SERVICE_NAME": workload,
        "OTEL_RESOURCE_ATTRIBUTES": ",".join(f"{k}={v}" for k, v in resource.items()),
        "OTEL_EXPORTER_OTLP_ENDPOINT": tracing.endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": repr(tracing.sample_ratio),
    }
    pod_name = {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    return [
        {"name": TRACING_POD_NAME, "valueFrom": pod_name},
        *({"name": k, "value": v} for k, v in values.items()),
    ]


def _container(spec: StackSpec, component: str, settings: Component) -> dict[str, Any]:
    secret = child_name(spec, "credentials")
    return {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["cqrs-stack"],
        "args": [component, "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": child_name(spec, "config")}}],
        "env": _env(spec, component, secret),
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        "resources": _resources(settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *_ca_mounts(spec)],
    }


def _cas(spec: StackSpec) -> list[tuple[str, str, CaBundle]]:
    """The CA bundles the pods mount: (volume name, folder, bundle)."""
    out: list[tuple[str, str, CaBundle]] = []
    if spec.database_tls is not None and spec.database_tls.ca is not None:
        out.append(("postgresql-ca", POSTGRES_CA_DIR, spec.database_tls.ca))
    if spec.redis_ca is not None:
        out.append(("redis-ca", REDIS_CA_DIR, spec.redis_ca))
    return out


def _ca_mounts(spec: StackSpec) -> list[dict[str, Any]]:
    return [{"name": name, "mountPath": folder, "readOnly": True} for name, folder, _ in _cas(spec)]


def _volumes(spec: StackSpec) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    for name, _, ca in _cas(spec):
        items = [{"key": ca.key, "path": ca.key}]
        source = (
            {"secret": {"secretName": ca.name, "items": items}}
            if ca.kind == "Secret"
            else {"configMap": {"name": ca.name, "items": items}}
        )
        volumes.append({"name": name, **source})
    return volumes


def default_spread(selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """Replicas spread over nodes as a preference (ScheduleAnyway: never unschedulable)."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": HOSTNAME_TOPOLOGY,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(selector)},
        }
    ]


def apply_pod_controls(
    template: Manifest,
    controls: PodControls,
    selector: Mapping[str, str],
    *,
    spread: bool = True,
) -> Manifest:
    """``template`` (a pod template: metadata and spec) with ``controls`` applied.

    The operator's own labels, annotations and environment win over the spec's: extra
    labels never change what a Deployment selects, and extra ``envFrom`` comes before the
    stack's ConfigMap (later sources win). ``spread``: without topologySpreadConstraints in
    the spec, the replicas spread over nodes (off for a Job's single pod).
    """
    meta = dict(template.get("metadata") or {})
    pod = dict(template["spec"])
    meta["labels"] = {**controls.pod_labels, **(meta.get("labels") or {})}
    annotations = {**controls.pod_annotations, **(meta.get("annotations") or {})}
    if annotations:
        meta["annotations"] = annotations
    if controls.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in controls.image_pull_secrets]
    if controls.node_selector:
        pod["nodeSelector"] = dict(controls.node_selector)
    if controls.affinity:
        pod["affinity"] = dict(controls.affinity)
    if controls.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_defaults=True) for t in controls.tolerations
        ]
    constraints = controls.topology_spread_constraints
    if constraints is None and spread:
        pod["topologySpreadConstraints"] = default_spread(selector)
    elif constraints:
        pod["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": dict(selector)}, **c} for c in constraints
        ]
    if controls.priority_class_name:
        pod["priorityClassName"] = controls.priority_class_name
    if controls.env_from:
        extra = [e.model_dump(by_alias=True, exclude_none=True) for e in controls.env_from]
        pod["containers"] = [
            {**c, "envFrom": [*extra, *(c.get("envFrom") or [])]} for c in pod["containers"]
        ]
    return {**template, "metadata": meta, "spec": pod}


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def component_settings(spec: StackSpec, component: str) -> Component:
    return {
        "write-api": spec.write_api,
        "read-api": spec.read_api,
        "projector": spec.projector,
    }[component]


def deployment(
    spec: StackSpec, component: str, replicas: int | None, config_digest: str
) -> Manifest:
    """The Deployment of ``component``; ``config_digest`` in the pod template rolls it.

    ``replicas`` None leaves the count to an autoscaler (HPA or KEDA): the field is not set.
    """
    settings = component_settings(spec, component)
    template = {
        "metadata": {
            "labels": labels(spec, component),
            "annotations": {CONFIG_HASH_ANNOTATION: config_digest},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "securityContext": _pod_security_context(),
            "containers": [_container(spec, component, settings)],
            "volumes": _volumes(spec),
        },
    }
    selector = selector_labels(spec, component)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, component, component),
        "spec": {
            **({"replicas": replicas} if replicas is not None else {}),
            "selector": {"matchLabels": selector},
            "template": apply_pod_controls(template, settings.pods, selector),
        },
    }


def service(spec: StackSpec, component: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, component, component),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec, component),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(spec: StackSpec, component: str) -> Manifest:
    """Keep an API serving through voluntary disruptions (node drains, upgrades).

    maxUnavailable 1 never blocks a drain of a single replica and keeps n-1 of n serving; it
    lives here, not in the chart, because the operator owns and scales these Deployments.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec, component, component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(spec, component)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def projector_replicas(spec: StackSpec, lag: int | None, current: int | None) -> int:
    """Replicas of the projector from one lag reading: the spec's, or with autoscaling
    ceil(lag/targetLag) bounded (the builtin scaler's windows: scaling.scale).

    Without a lag reading (Redis unreachable) autoscaling keeps ``current`` (or the minimum).
    """
    auto = spec.projector.autoscaling
    if not auto.enabled:
        return spec.projector.replicas
    if lag is None:
        wanted = current if current is not None else auto.min_replicas
        return max(auto.min_replicas, min(auto.max_replicas, wanted))
    return scaling.wanted(auto, lag)


def horizontal_pod_autoscaler(spec: StackSpec, component: str, hpa: ApiAutoscaling) -> Manifest:
    """A CPU HorizontalPodAutoscaler (autoscaling/v2) for an API's Deployment."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec, component, component),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": child_name(spec, component),
            },
            "minReplicas": hpa.min_replicas,
            "maxReplicas": hpa.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": hpa.target_cpu_utilization,
                        },
                    },
                }
            ],
        },
    }


def scaled_object(spec: StackSpec, redis_url: str) -> Manifest:
    """A KEDA ScaledObject scaling the projector on the consumer group's lag.

    The trigger reads the stack's stream and group at the pods' Redis (host and port only:
    the login comes from the TriggerAuthentication, never from this object).
    """
    auto = spec.projector.autoscaling
    parts = urlsplit(redis_url)
    database = (parts.path or "/0").lstrip("/") or "0"
    trigger: dict[str, Any] = {
        "type": "redis-streams",
        "metadata": {
            "address": f"{parts.hostname}:{parts.port or 6379}",
            "stream": spec.stream_name,
            "consumerGroup": spec.consumer_group,
            "lagCount": str(auto.target_lag),
            "databaseIndex": database,
            "enableTLS": "true" if parts.scheme == "rediss" else "false",
        },
    }
    if keda_redis_login(redis_url):
        trigger["authenticationRef"] = {"name": child_name(spec, "projector")}
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": _metadata(spec, "projector", "projector"),
        "spec": {
            "scaleTargetRef": {"name": child_name(spec, "projector")},
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleUp": {"stabilizationWindowSeconds": auto.scale_up_window_seconds},
                        "scaleDown": {"stabilizationWindowSeconds": auto.scale_down_window_seconds},
                    }
                }
            },
            "triggers": [trigger],
        },
    }


def trigger_authentication(spec: StackSpec, redis_url: str) -> Manifest:
    """KEDA's Redis login: keys of the stack's credentials Secret (never the values)."""
    keys = {"REDIS_USERNAME": "username", "REDIS_PASSWORD": "password"}
    present = keda_redis_login(redis_url)
    secret = child_name(spec, "credentials")
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _metadata(spec, "projector", "projector"),
        "spec": {
            "secretTargetRef": [
                {"parameter": keys[k], "name": secret, "key": k}
                for k in KEDA_REDIS_KEYS
                if k in present
            ]
        },
    }


def autoscalers(spec: StackSpec, redis_url: str) -> list[Manifest]:
    """The HPAs of the APIs that autoscale and, with engine keda, the projector's ScaledObject."""
    out = [
        horizontal_pod_autoscaler(spec, c, hpa)
        for c, hpa in (("write-api", spec.write_api.hpa), ("read-api", spec.read_api.hpa))
        if hpa is not None
    ]
    if uses_keda(spec):
        if keda_redis_login(redis_url):
            out.append(trigger_authentication(spec, redis_url))
        out.append(scaled_object(spec, redis_url))
    return out


def initial_replicas(spec: StackSpec, component: str) -> int:
    """The count a Deployment an autoscaler owns is created with: the autoscaler's minimum
    (the autoscaler takes it from there; the operator never applies it again)."""
    hpa = {"write-api": spec.write_api.hpa, "read-api": spec.read_api.hpa}.get(component)
    if hpa is not None:
        return hpa.min_replicas
    return spec.projector.autoscaling.min_replicas


def workloads(
    spec: StackSpec, config_digests: str | Mapping[str, str], projector_count: int | None
) -> list[Manifest]:
    """The three Deployments, two Services and the APIs' disruption budgets, in apply order.

    ``config_digests``: one digest for all, or one per component (``component_hashes``).

    A component an autoscaler owns gets no replicas (None): the operator leaves them to it.
    """
    replicas = {
        "write-api": None if spec.write_api.hpa else spec.write_api.replicas,
        "read-api": None if spec.read_api.hpa else spec.read_api.replicas,
        "projector": None if uses_keda(spec) else projector_count,
    }
    digests = (
        dict.fromkeys(COMPONENTS, config_digests)
        if isinstance(config_digests, str)
        else config_digests
    )
    out = [deployment(spec, c, replicas[c], digests[c]) for c in COMPONENTS]
    out += [service(spec, c) for c in SERVED_COMPONENTS]
    out += [pod_disruption_budget(spec, c) for c in SERVED_COMPONENTS]
    return out


def migration_job_name(spec: StackSpec) -> str:
    """``<stack>-migrate-<digest of the image>``: one Job per image version, idempotent
    across reconciles; the digest is cut so that the name stays a DNS label (63)."""
    digest = hashlib.sha256(spec.image.encode()).hexdigest()
    stem = child_name(spec, MIGRATE) + "-"
    return stem + digest[: max(4, min(10, 63 - len(stem)))]


def migration_job(spec: StackSpec) -> Manifest:
    """The Job that runs ``cqrs-stack migrate`` of the stack's own image, as the stack's role.

    It gets the database URLs only (no Redis), writes its JSON report to the termination
    message, and is bounded: MIGRATION_BACKOFF_LIMIT retries within
    MIGRATION_DEADLINE_SECONDS, then removed after MIGRATION_TTL_SECONDS.
    """
    name = migration_job_name(spec)
    job = stack_job(
        spec,
        MIGRATE,
        name,
        [MIGRATE],
        [{"name": "MIGRATE_REPORT_FILE", "value": MIGRATION_REPORT_PATH}],
        pod_label="cqrs.dev/migration-job",
        backoff_limit=MIGRATION_BACKOFF_LIMIT,
        deadline_seconds=MIGRATION_DEADLINE_SECONDS,
    )
    job["metadata"]["annotations"] = {IMAGE_ANNOTATION: spec.image}
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = (
        MIGRATION_REPORT_PATH
    )
    return job


def stack_job(
    spec: StackSpec,
    component: str,
    name: str,
    args: list[str],
    env: list[dict[str, Any]],
    *,
    pod_label: str,
    backoff_limit: int,
    deadline_seconds: int,
) -> Manifest:
    """A Job ``name`` running ``cqrs-stack <args>`` of the stack's own image, as the stack's role.

    The one shape of the stack's Jobs (the migration, a rebuild): the database URLs only (no
    Redis), LOG_LEVEL and ``env``, spec.migrationJob's pod controls and resources, one pod
    (labelled ``pod_label: name``) never restarted in place, removed MIGRATION_TTL_SECONDS
    after it finished (the operator records its outcome in the stack's status long before).
    """
    secret = child_name(spec, "credentials")
    controls = spec.migration_job
    container = _container(spec, component, Component(replicas=1, resources=controls.resources))
    for probe in ("livenessProbe", "readinessProbe", "startupProbe", "ports"):
        del container[probe]
    container["args"] = list(args)
    container["envFrom"] = []
    wanted = ("WRITE_DB_URL", "READ_DB_URL", "PGSSLMODE", "PGSSLROOTCERT")
    container["env"] = [e for e in _env(spec, component, secret) if e["name"] in wanted] + [
        {"name": "LOG_LEVEL", "value": spec.log_level},
        *env,
    ]
    # A failure without a report (an image that writes none) shows its last log lines.
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_labels = {**labels(spec, component), pod_label: name}
    template = {
        "metadata": {"labels": pod_labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": _volumes(spec),
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**_metadata(spec, component, component), "name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": deadline_seconds,
            "ttlSecondsAfterFinished": MIGRATION_TTL_SECONDS,
            # spec.migrationJob's pod controls; one pod: no default spread over nodes.
            "template": apply_pod_controls(template, controls, {pod_label: name}, spread=False),
        },
    }

"""The operator's few calls to the Kubernetes API: read Secrets, server-side apply children,
read the Deployments' status and their pods' container states.

Server-side apply with one field manager makes applying idempotent: an unchanged object is
not written again (its resourceVersion stays), and fields set by others are left alone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from .schema import CRD_VERSION_ANNOTATION

FIELD_MANAGER = "cqrs-stack-operator"
# Replica counts are applied by a field manager of their own: the main apply never sets them,
# so a Deployment an autoscaler owns keeps the count the autoscaler gave it (see reconcile).
REPLICAS_FIELD_MANAGER = "cqrs-stack-operator-replicas"
# Children that are custom resources: kind -> (group, version, plural).
CUSTOM_KINDS = {
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "TriggerAuthentication": ("keda.sh", "v1alpha1", "triggerauthentications"),
}
# The field manager of the CRD the operator applies at start: the product's name, so that
# `kubectl get crd -o yaml --show-managed-fields` says who wrote it.
CRD_FIELD_MANAGER = "cqrs-stack"
APPLY = "application/apply-patch+yaml"

log = logging.getLogger(__name__)


# The children's kinds: the API class and the resource part of its method names.
_KINDS: dict[str, tuple[Any, str]] = {
    "ConfigMap": (client.CoreV1Api, "config_map"),
    "Secret": (client.CoreV1Api, "secret"),
    "Service": (client.CoreV1Api, "service"),
    "Deployment": (client.AppsV1Api, "deployment"),
    "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
    "HorizontalPodAutoscaler": (client.AutoscalingV2Api, "horizontal_pod_autoscaler"),
    "Job": (client.BatchV1Api, "job"),
}


def _method(api: client.ApiClient, verb: str, kind: str) -> Callable[..., Awaitable[Any]]:
    """``<verb>_namespaced_<resource>`` of the API that serves ``kind`` (read, patch)."""
    cls, resource = _KINDS[kind]
    method: Callable[..., Awaitable[Any]] = getattr(cls(api), f"{verb}_namespaced_{resource}")
    return method


@dataclass(frozen=True)
class SecretData:
    """A Secret's decoded data with its labels and annotations (the opt-in marks)."""

    data: dict[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    controller_uid: str | None = None  # the uid of its controlling owner, if any


async def connect() -> client.ApiClient:
    """An API client from $KUBECONFIG, else the in-cluster account, else ~/.kube/config."""
    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    path = kubeconfig or str(Path.home() / ".kube" / "config")
    return await config.new_client_from_config(config_file=path)


async def read_secret(api: client.ApiClient, namespace: str, name: str) -> SecretData | None:
    """Secret ``namespace/name`` decoded, or None when it does not exist."""
    try:
        secret = await client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return SecretData(
        data={k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()},
        labels=dict(secret.metadata.labels or {}),
        annotations=dict(secret.metadata.annotations or {}),
        controller_uid=next(
            (r.uid for r in secret.metadata.owner_references or [] if r.controller), None
        ),
    )


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the controlling owner of a live object (as a dict), if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


async def read_object(
    api: client.ApiClient, kind: str, namespace: str, name: str
) -> dict[str, Any] | None:
    """A child of kind ``kind`` as a dict, or None when it does not exist."""
    if kind in CUSTOM_KINDS:
        return await _read_custom(api, kind, namespace, name)
    try:
        live = await _method(api, "read", kind)(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    result: dict[str, Any] = api.sanitize_for_serialization(live)
    return result


async def read_config_map(
    api: client.ApiClient, namespace: str, name: str
) -> dict[str, str] | None:
    """The data of ConfigMap ``namespace/name``, or None when it does not exist."""
    live = await read_object(api, "ConfigMap", namespace, name)
    return None if live is None else dict(live.get("data") or {})


# Bounds of the API server's refusal carried into a condition message.
MAX_CAUSES = 5
MAX_CAUSE_CHARS = 200


def refusal_causes(exc: ApiException, *, messages: bool = True) -> str:
    """Why the API server refused a write, from its Status body: ``field: message`` of each
    cause (at most MAX_CAUSES), else the Status message. ``messages`` False keeps the field
    names only: for a Secret, whose refusal may quote the refused value."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    if not isinstance(status, dict):
        return ""
    causes = (status.get("details") or {}).get("causes") or []
    parts = []
    for cause in causes[:MAX_CAUSES]:
        where = str(cause.get("field") or "")
        text = str(cause.get("message") or "")[:MAX_CAUSE_CHARS] if messages else ""
        parts.append(": ".join(p for p in (where, text) if p))
    if len(causes) > MAX_CAUSES:
        parts.append(f"and {len(causes) - MAX_CAUSES} more")
    if not any(parts) and messages:
        return str(status.get("message") or "")[: MAX_CAUSE_CHARS * 2]
    return "; ".join(p for p in parts if p)


async def data_digest(api: client.ApiClient, kind: str, namespace: str, name: str) -> str:
    """A digest of the data of Secret or ConfigMap ``namespace/name`` ("absent" when it does
    not exist, e.g. an optional envFrom source): the operator hashes it, never shows it."""
    live = await read_object(api, kind, namespace, name)
    if live is None:
        return "absent"
    blob = json.dumps(
        {"data": live.get("data") or {}, "binaryData": live.get("binaryData") or {}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


async def read_deployment(
    api: client.ApiClient, namespace: str, name: str
) -> dict[str, Any] | None:
    """Deployment ``namespace/name`` as a dict (spec and status), or None when absent."""
    return await read_object(api, "Deployment", namespace, name)


async def list_pods(
    api: client.ApiClient, namespace: str, selector: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The pods matching ``selector`` (their status tells why a Deployment is unavailable)."""
    label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
    pods = await client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=label_selector)
    result: list[dict[str, Any]] = api.sanitize_for_serialization(pods.items)
    return result


async def list_jobs(
    api: client.ApiClient, namespace: str, selector: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The Jobs matching ``selector`` (a stack's rebuild Jobs: one at a time)."""
    label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
    jobs = await client.BatchV1Api(api).list_namespaced_job(
        namespace, label_selector=label_selector
    )
    result: list[dict[str, Any]] = api.sanitize_for_serialization(jobs.items)
    return result


async def _read_custom(
    api: client.ApiClient, kind: str, namespace: str, name: str
) -> dict[str, Any] | None:
    """A custom-resource child, or None when it (or its resource type) does not exist."""
    group, version, plural = CUSTOM_KINDS[kind]
    try:
        found: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            group, version, namespace, plural, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


async def delete_object(api: client.ApiClient, kind: str, namespace: str, name: str) -> None:
    """Delete an autoscaler the spec no longer asks for, or a rebuild Job it no longer wants
    (404: already gone)."""
    try:
        if kind in CUSTOM_KINDS:
            group, version, plural = CUSTOM_KINDS[kind]
            await client.CustomObjectsApi(api).delete_namespaced_custom_object(
                group, version, namespace, plural, name
            )
        elif kind == "HorizontalPodAutoscaler":
            await _method(api, "delete", kind)(name, namespace)
        elif kind == "Job":  # a rebuild cancelled: its pod goes with it
            await _method(api, "delete", kind)(name, namespace, propagation_policy="Background")
        else:
            raise ValueError(f"the operator deletes no {kind}")
    except ApiException as exc:
        if exc.status != 404:
            raise


async def apply_replicas(api: client.ApiClient, namespace: str, name: str, replicas: int) -> None:
    """Server-side apply only ``spec.replicas`` of Deployment ``name``, by its own manager."""
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    }
    patch: Callable[..., Awaitable[Any]] = client.AppsV1Api(api).patch_namespaced_deployment
    await patch(
        name,
        namespace,
        body,
        field_manager=REPLICAS_FIELD_MANAGER,
        force=True,
        _content_type=APPLY,
    )


async def apply(api: client.ApiClient, manifest: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply ``manifest`` (taking ownership of its fields); return the live object."""
    meta = manifest["metadata"]
    if manifest["kind"] in CUSTOM_KINDS:
        group, version, plural = CUSTOM_KINDS[manifest["kind"]]
        patch: Callable[..., Awaitable[Any]] = client.CustomObjectsApi(
            api
        ).patch_namespaced_custom_object
        applied: dict[str, Any] = await patch(
            group,
            version,
            meta["namespace"],
            plural,
            meta["name"],
            manifest,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )
        return applied
    live = await _method(api, "patch", manifest["kind"])(
        meta["name"],
        meta["namespace"],
        manifest,
        field_manager=FIELD_MANAGER,
        force=True,
        _content_type=APPLY,
    )
    result: dict[str, Any] = api.sanitize_for_serialization(live)
    return result


def _read_yaml(path: str) -> dict[str, Any]:
    with open(path) as source:
        loaded: dict[str, Any] = yaml.safe_load(source)
    return loaded


def version_key(version: str) -> tuple[tuple[int, ...], int, tuple[str, ...]] | None:
    """A sort key for a release version ``1.2.3``, ``v1.2``, ``1.2.3-rc.1`` (a pre-release
    sorts before its release), or None when ``version`` is not one."""
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        return None
    release = tuple(int(part) for part in match["release"].split("."))
    release = release + (0,) * (3 - len(release))  # 1.2 == 1.2.0
    pre = match["pre"]
    if pre is None:
        return release, 1, ()
    parts = tuple(f"{int(p):020d}" if p.isdigit() else p for p in re.split(r"[.-]", pre))
    return release, 0, parts


_VERSION = re.compile(r"v?(?P<release>\d+(?:\.\d+){0,3})(?:[-.]?(?P<pre>[0-9A-Za-z.-]+))?")


def crd_version(crd: Mapping[str, Any]) -> str | None:
    """The release recorded in a CRD's annotation, None when it carries none."""
    annotations = (crd.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(CRD_VERSION_ANNOTATION)
    return value if isinstance(value, str) else None


def crd_is_newer(live: str | None, ours: str | None) -> bool:
    """Whether a live CRD of release ``live`` must be left alone by an operator whose CRD is of
    release ``ours``: it is newer, or its version cannot be read (not proven older). A live CRD
    without the annotation predates it, hence is older."""
    if live is None:
        return False
    live_key = version_key(live)
    ours_key = version_key(ours) if ours is not None else None
    if live_key is None or ours_key is None:
        return True
    return live_key > ours_key


async def apply_crd(api: client.ApiClient, path: str) -> bool:
    """Server-side apply the CustomResourceDefinition in YAML file ``path`` (forced: the
    fields Helm wrote at install become this manager's, so an upgrade may change them), unless
    the live one is of a newer release (annotation ``cqrs.dev/operator-version``): an older
    operator (a rollback, an older install beside a newer one) would otherwise replace it and
    the API server would prune the newer fields from the stored stacks. True when applied."""
    crd = await asyncio.to_thread(_read_yaml, path)
    name = crd["metadata"]["name"]
    ext = client.ApiextensionsV1Api(api)
    ours = crd_version(crd)
    try:
        live = api.sanitize_for_serialization(await ext.read_custom_resource_definition(name))
    except ApiException as exc:
        if exc.status != 404:
            log.warning(
                "CRD not applied name=%s status=%s reason=%s (its version could not be read)",
                name,
                exc.status,
                exc.reason,
            )
            return False
        live = None
    if live is not None and crd_is_newer(crd_version(live), ours):
        log.warning(
            "CRD not applied name=%s live_version=%s file_version=%s: the installed CRD is of "
            "a newer release than this operator; it is kept (applying an older one would prune "
            "newer fields from stored stacks). Upgrade the operator, or apply this CRD by hand "
            "if the downgrade is meant.",
            name,
            crd_version(live),
            ours or "-",
        )
        return False
    patch: Callable[..., Awaitable[Any]] = ext.patch_custom_resource_definition
    try:
        await patch(name, crd, field_manager=CRD_FIELD_MANAGER, force=True, _content_type=APPLY)
    except ApiException as exc:
        # Not fatal: the CRD installed with the chart keeps working, the new fields wait.
        log.warning("CRD not applied name=%s status=%s reason=%s", name, exc.status, exc.reason)
        return False
    log.info(
        "CRD applied name=%s file=%s version=%s field_manager=%s",
        name,
        path,
        ours or "-",
        CRD_FIELD_MANAGER,
    )
    return True

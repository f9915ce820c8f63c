"""kopf wiring only: each handler parses the spec, calls the reconciler, reports in status."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import kopf

from . import kube, manifests, provisioning, reconcile
from . import status as stack_status
from .provisioning import ProvisioningError
from .spec import GROUP, PLURAL, VERSION, SpecError, StackSpec, parse_spec

RESOURCE = (GROUP, VERSION, PLURAL)
STATUS_INTERVAL = float(os.environ.get("CQRS_OPERATOR_STATUS_INTERVAL", "15"))
RETRY_DELAY = float(os.environ.get("CQRS_OPERATOR_RETRY_DELAY", "5"))
MAX_RETRY_DELAY = 120.0


def backoff(retry: int) -> float:
    """Exponential back-off for a failed reconcile: RETRY_DELAY * 2**retry, at most 2 minutes."""
    return min(RETRY_DELAY * 2 ** min(retry, 10), MAX_RETRY_DELAY)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "cqrs.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="cqrs.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="cqrs.dev", key="last-handled-configuration"
    )
    settings.scanning.disabled = True  # no CRD/namespace watching: no RBAC for them needed
    memo.api = await kube.connect()


@kopf.on.cleanup()
async def disconnect(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "api", None) is not None:
        await memo.api.close()


def _parse(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> StackSpec:
    return parse_spec(spec, namespace=meta["namespace"], name=meta["name"])


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
@kopf.on.resume(*RESOURCE)
async def reconcile_stack(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    retry: int,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    generation = meta.get("generation")
    try:
        stack = _parse(spec, meta)
    except SpecError as exc:
        invalid = stack_status.Condition(stack_status.WORKLOADS, False, "InvalidSpec", str(exc))
        patch.status.update(stack_status.summary(status, [invalid], generation))
        raise kopf.PermanentError(str(exc)) from exc
    outcome = await reconcile.reconcile(
        memo.api, stack, status, adopt=lambda manifest: kopf.adopt(manifest, owner=body)
    )
    patch.status.update(stack_status.summary(status, outcome.conditions, generation))
    patch.status.update(outcome.extra)
    if outcome.error is not None:
        raise kopf.TemporaryError(
            f"{outcome.error.reason}: {outcome.error.message}", delay=backoff(retry)
        )


@kopf.timer(*RESOURCE, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
async def observe_stack(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Report the projector's lag; once Ready, re-apply the workloads (drift, autoscaling)."""
    if meta.get("deletionTimestamp"):
        return
    try:
        stack = _parse(spec, meta)
    except SpecError:
        return
    by_type = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if by_type.get(stack_status.STREAM) != "True":
        return
    projector: dict[str, Any] = {}
    try:
        url = await reconcile.redis_url(memo.api, stack)
        lag: int | None = await provisioning.stream_lag(
            url, stack.stream_name, stack.consumer_group
        )
        projector["lag"] = lag
    except ProvisioningError as exc:
        logger.warning(f"lag unknown reason={exc.reason} message={exc.message}")
        lag = None
    current = reconcile.current_projector_replicas(status)
    settled = by_type.get(stack_status.READY) == "True" and status.get(
        "observedGeneration"
    ) == meta.get("generation")
    if settled and lag is not None:
        count = manifests.projector_replicas(stack, lag, current)
        password = await reconcile.stack_password(memo.api, stack)
        await reconcile.apply_workloads(
            memo.api,
            stack,
            password,
            url,
            count,
            adopt=lambda manifest: kopf.adopt(manifest, owner=body),
        )
        if count != current:
            logger.info(f"projector scaled replicas={count} lag={lag}")
        projector["replicas"] = count
    if projector:
        patch.status["projector"] = projector


@kopf.on.delete(*RESOURCE)
async def delete_stack(
    spec: kopf.Spec,
    meta: kopf.Meta,
    retry: int,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """deletionPolicy Delete drops databases, role and stream; Retain keeps them."""
    try:
        stack = _parse(spec, meta)
    except SpecError as exc:
        logger.warning(f"spec unreadable, nothing removed: {exc}")
        return
    if stack.deletion_policy != "Delete":
        logger.info(
            f"deletionPolicy=Retain: kept databases {stack.write_db.name}, "
            f"{stack.read_db.name}, role {stack.role} and stream {stack.stream_name}"
        )
        return
    try:
        await reconcile.teardown(memo.api, stack)
    except ProvisioningError as exc:
        if exc.reason == "SecretNotFound" and retry >= 3:
            raise kopf.PermanentError(f"giving up teardown: {exc.message}") from exc
        raise kopf.TemporaryError(f"{exc.reason}: {exc.message}", delay=backoff(retry)) from exc
    logger.info(
        f"deletionPolicy=Delete: dropped databases {stack.write_db.name}, "
        f"{stack.read_db.name}, role {stack.role} and stream {stack.stream_name}"
    )

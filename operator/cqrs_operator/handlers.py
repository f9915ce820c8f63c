"""kopf wiring only: each handler parses the spec, calls the reconciler, reports in status.

The same reconcile runs on every change and on every interval (level-triggered): a dropped
role, a deleted Secret or a drifted Deployment is found and repaired without a spec change.
Every step that changes the world is an Event with a greppable reason; a refusal (another
stack's object, a Secret that did not opt in) is a Warning Event when it first appears.

With leader election (``memo.leadership``) every handler first checks that this replica
still leads, and the operator's API client checks it before each request.

The annotation ``cqrs.dev/reconcile: paused`` pauses a stack (as Strimzi's
``strimzi.io/pause-reconciliation``): no handler changes anything of it (no apply, no
provisioning, no scaling, no rotation) and condition ``ReconciliationPaused`` is True. A
paused stack that is deleted keeps its databases, role and stream whatever its
deletionPolicy (its children go with it, by their ownerReferences): a pause means hands off.
kopf ignores changes of cqrs.dev/ annotations (its own prefix), so removing the annotation
takes effect at the next interval (CQRS_OPERATOR_STATUS_INTERVAL), which then applies
whatever changed meanwhile, and sets ``ReconciliationPaused`` False on every reconcile path
(an invalid spec included). Only the exact value ``paused`` pauses; any other value is
reported (Warning Event ``PauseValueIgnored``, the condition's message) and reconciled.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from . import kube, leadership, rebuild_job, reconcile, rotation
from . import metrics as operator_metrics
from . import status as stack_status
from .errors import ProvisioningError
from .spec import GROUP, PLURAL, VERSION, SpecError, StackSpec, parse_spec

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
# Seconds between two full reconciles of a stack (re-verification, lag, drift correction).
STATUS_INTERVAL = float(os.environ.get("CQRS_OPERATOR_STATUS_INTERVAL", "15"))
RETRY_DELAY = float(os.environ.get("CQRS_OPERATOR_RETRY_DELAY", "5"))
# Seconds the delete handler retries a failing teardown before it releases the finalizer.
DELETE_TIMEOUT = float(os.environ.get("CQRS_OPERATOR_DELETE_TIMEOUT", "300"))
MAX_RETRY_DELAY = 120.0
PAUSE_ANNOTATION, PAUSED = "cqrs.dev/reconcile", "paused"
IGNORED_PAUSE_REASON = "PauseValueIgnored"  # a cqrs.dev/reconcile value other than "paused"
# Set on a stack being deleted once its teardown ended (delete_stack):
# "<outcome> at <time> of deletion <deletionTimestamp>".
TEARDOWN_ANNOTATION = "cqrs.dev/teardown"
_LOCKS: dict[str, asyncio.Lock] = {}


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
    # kopf removes the finalizer of a deleted stack only once its status timer has exited,
    # and looks again only every cancellation_polling seconds (60 by default): a stack
    # deleted while its timer was reconciling stayed a minute longer than its teardown.
    settings.background.cancellation_polling = 1.0
    memo.api = await kube.connect()
    if getattr(memo, "leadership", None) is not None:
        memo.api = await leadership.fence(memo.api, memo.leadership)
    if getattr(memo, "crd_file", None):
        await kube.apply_crd(memo.api, memo.crd_file)


@kopf.on.cleanup()
async def disconnect(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "api", None) is not None:
        await memo.api.close()


def _parse(
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    status: Mapping[str, Any],
    memo: kopf.Memo | None = None,
) -> StackSpec:
    return parse_spec(
        spec,
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        status=status,
        # A stack that pins no tag runs the operator's (it moves with operator upgrades).
        default_tag=getattr(memo, "image_tag", None),
    )


def _fence(memo: kopf.Memo) -> None:
    """With leader election: exit at once unless this replica still leads."""
    elected = getattr(memo, "leadership", None)
    if elected is not None:
        elected.ensure_leading()


def paused(meta: Mapping[str, Any]) -> bool:
    """Whether the stack carries ``cqrs.dev/reconcile: paused``."""
    return (meta.get("annotations") or {}).get(PAUSE_ANNOTATION) == PAUSED


def _pause(meta: Mapping[str, Any], status: Mapping[str, Any], patch: kopf.Patch) -> None:
    """Report the pause, and nothing else: the other conditions and observedGeneration stay
    as the last reconcile left them (a spec changed meanwhile shows as a newer generation)."""
    cond = stack_status.Condition(
        stack_status.PAUSED,
        True,
        "ReconciliationPaused",
        f"{PAUSE_ANNOTATION}: {PAUSED}: no change is made to this stack until it is removed",
    )
    current = status.get("conditions") or []
    if any(c.get("type") == cond.type and c.get("status") == "True" for c in current):
        return  # already said: no write at every interval
    patch.status["conditions"] = stack_status.merge_conditions(
        current, [cond], meta.get("generation")
    )


def _resumed(
    body: kopf.Body, meta: Mapping[str, Any], status: Mapping[str, Any]
) -> list[stack_status.Condition]:
    """ReconciliationPaused=False on every reconcile of a stack that is not paused (none if
    it never was). Only the value ``paused`` pauses (exactly: the annotation is a contract,
    not a guess); another value (``Paused``, ``true``) is named in a Warning Event, a log line
    and the condition's message, so that a user who meant to pause learns it did not."""
    value = (meta.get("annotations") or {}).get(PAUSE_ANNOTATION)
    old = next(
        (c for c in status.get("conditions") or [] if c.get("type") == stack_status.PAUSED), None
    )
    if value is not None:
        shown = value if len(value) <= 63 else value[:60] + "..."
        cond = stack_status.Condition(
            stack_status.PAUSED,
            False,
            IGNORED_PAUSE_REASON,
            f"{PAUSE_ANNOTATION}: {shown!r} ignored: only {PAUSED!r} pauses; reconciling",
        )
        if old is None or (old.get("reason"), old.get("message")) != (cond.reason, cond.message):
            log.warning("stack %s/%s: %s", meta.get("namespace"), meta.get("name"), cond.message)
            kopf.warn(body, reason=IGNORED_PAUSE_REASON, message=cond.message)
        return [cond]
    if old is not None:
        return [
            stack_status.Condition(
                stack_status.PAUSED, False, "ReconciliationResumed", "reconciled again"
            )
        ]
    return []


def _report(body: kopf.Body, status: Mapping[str, Any], outcome: reconcile.Outcome) -> None:
    """Events: one per change; a Warning per failed part whose reason is new."""
    for change in outcome.changes:
        event = kopf.warn if change.warning else kopf.info
        event(body, reason=change.reason, message=change.message)
    before = {c.get("type"): c for c in status.get("conditions") or []}
    for cond in outcome.conditions:
        old = before.get(cond.type, {})
        # A part on its way (a rollout, a rotation) is no failure: no Warning for it.
        if (
            cond.status is False
            and cond.type != stack_status.REBUILDING  # its Events are the rebuild's own
            and cond.reason not in stack_status.PENDING_REASONS
            and (old.get("status"), old.get("reason")) != ("False", cond.reason)
        ):
            kopf.warn(body, reason=cond.reason, message=f"{cond.type}: {cond.message}")


@operator_metrics.instrumented
async def _reconcile(
    body: kopf.Body,
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    status: Mapping[str, Any],
    patch: kopf.Patch,
    memo: kopf.Memo,
) -> reconcile.Outcome | None:
    """One full reconcile of the stack, serialised with any other for the same stack."""
    generation = meta.get("generation")
    try:
        stack = _parse(spec, meta, status, memo)
    except SpecError as exc:
        invalid = stack_status.Condition(stack_status.WORKLOADS, False, "InvalidSpec", str(exc))
        # A resumed stack whose spec is invalid is resumed all the same: say so here too.
        updates = [invalid, *_resumed(body, meta, status)]
        patch.status.update(stack_status.summary(status, updates, generation))
        return None
    # One lock per stack held across read, compute and write of the status: the creation
    # handler (retrying) and the timer both reconcile, and a status left to kopf's patch
    # would be written after the lock is released, so that an older reading (a lag, a
    # condition) could land after a newer one. Under the lock each reconcile starts from
    # the status the previous one wrote, and writes its own before the next one starts.
    async with _LOCKS.setdefault(meta["uid"], asyncio.Lock()):
        current = await _read_status(memo.api, meta)
        if current is None:
            # Gone, or deleted while this call waited for the lock (a timer's, queued behind
            # the teardown): a reconcile now would provision again what the teardown dropped.
            return reconcile.Outcome()
        if (current.get("observedGeneration") or 0) > (generation or 0):
            # A newer spec was reconciled meanwhile: this call's spec is older, applying it
            # would roll the stack back.
            return reconcile.Outcome()
        outcome = await reconcile.reconcile(
            memo.api,
            stack,
            current,
            adopt=lambda manifest: kopf.adopt(manifest, owner=body),
            rotate=(meta.get("annotations") or {}).get(rotation.ROTATE_ANNOTATION, ""),
            rebuild=(meta.get("annotations") or {}).get(rebuild_job.REBUILD_ANNOTATION, ""),
        )
        _report(body, current, outcome)
        updates = [*outcome.conditions, *_resumed(body, meta, current)]
        written = stack_status.summary(current, updates, generation)
        written.update(outcome.extra)
        await _write_status(memo.api, meta, written)
    return outcome


async def _read_status(api: Any, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stack's status as the API server has it now (None: the stack is gone or being
    deleted)."""
    try:
        obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"]
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    if (obj.get("metadata") or {}).get("uid") != meta["uid"]:
        return None  # another stack of the same name: not this one's to write
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status: dict[str, Any] = obj.get("status") or {}
    return status


async def _write_status(api: Any, meta: Mapping[str, Any], fields: dict[str, Any]) -> None:
    """Merge-patch ``fields`` into the stack's status (a stack deleted meanwhile is skipped)."""
    # Typed loosely: the generated signature does not declare _content_type.
    patch: Callable[..., Awaitable[Any]] = client.CustomObjectsApi(
        api
    ).patch_namespaced_custom_object_status
    try:
        await patch(
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            {"status": fields},
            _content_type="application/merge-patch+json",
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


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
    _fence(memo)
    if paused(meta):
        _pause(meta, status, patch)
        return
    outcome = await _reconcile(body, spec, meta, status, patch, memo)
    if outcome is None:
        raise kopf.PermanentError("invalid spec (see the WorkloadsReady condition)")
    transient = [e for e in outcome.errors if not e.permanent]
    if transient:  # permanent trouble waits for a change; the timer re-checks it anyway
        raise kopf.TemporaryError(
            f"{transient[0].reason}: {transient[0].message}", delay=backoff(retry)
        )


@kopf.timer(*RESOURCE, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
async def reverify_stack(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Every interval: re-verify and repair every part (databases, role, stream, children),
    report the projector's lag and scale it when autoscaling is on."""
    _fence(memo)
    if meta.get("deletionTimestamp"):
        return
    if paused(meta):
        _pause(meta, status, patch)
        return
    await _reconcile(body, spec, meta, status, patch, memo)


@kopf.on.event(*RESOURCE)
async def watch_stack(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Keep the stack metrics (phase, Ready) as the API server shows each stack: its initial
    listing after a start, every change (the status patches included), its deletion."""
    meta = body.get("metadata") or {}
    if event["type"] == "DELETED":
        operator_metrics.STACKS.forget(meta["namespace"], meta["name"])
    else:
        operator_metrics.STACKS.observe(body)


@kopf.on.delete(*RESOURCE)
async def delete_stack(meta: kopf.Meta, patch: kopf.Patch, **kwargs: Any) -> None:
    """deletionPolicy Delete drops the databases, role and stream this stack created (never
    adopted ones, never another stack's); Retain keeps them. A teardown that keeps failing
    is retried with back-off for CQRS_OPERATOR_DELETE_TIMEOUT seconds, then the finalizer is
    released with a Warning Event naming what was left behind. A paused stack keeps all.

    The teardown runs once per deletion: its end is recorded in annotation
    ``cqrs.dev/teardown``. kopf forgets that its delete handler succeeded as soon as it does
    (it purges its progress annotations) but keeps the finalizer while a timer's reconcile is
    still exiting, and then calls the handler again; the record makes that call a no-op. A
    teardown interrupted (the operator killed) has no record: the next call finishes it, each
    step being idempotent (what is already gone is skipped)."""
    _fence(kwargs["memo"])
    where = f"{meta['namespace']}/{meta['name']}"
    # The record names the deletion it belongs to: one set beforehand (by hand) counts not.
    deletion = meta.get("deletionTimestamp") or ""
    done = (meta.get("annotations") or {}).get(TEARDOWN_ANNOTATION, "")
    if deletion and done.endswith(f" of deletion {deletion}"):
        log.info("stack %s: teardown already finished (%s): not run again", where, done)
    else:
        lock = _LOCKS.setdefault(meta["uid"], asyncio.Lock())
        if lock.locked():
            log.info("stack %s: teardown waits for the reconcile under way", where)
        # The lock is taken, not only dropped: a timer's reconcile still running would
        # otherwise overlap the teardown (and recreate what it drops).
        async with lock:
            outcome = await _delete(meta=meta, **kwargs)
        # In the same request as kopf's purge of its own record: never one without the other.
        patch.metadata.annotations[TEARDOWN_ANNOTATION] = (
            f"{outcome} at {stack_status.now()} of deletion {deletion}"
        )
    _LOCKS.pop(meta["uid"], None)
    # A DELETED watch event can be missed (a watch restarted): the stack is gone all the same.
    operator_metrics.STACKS.forget(meta["namespace"], meta["name"])


async def _delete(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    retry: int,
    runtime: datetime.timedelta,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> str:
    """Tear the stack down as its deletionPolicy says; return the outcome's Event reason."""
    try:
        stack = _parse(spec, meta, status, memo)
    except SpecError as exc:
        kopf.warn(body, reason="CleanupSkipped", message=f"spec unreadable, nothing removed: {exc}")
        return "CleanupSkipped"
    kept = (
        f"databases {stack.write_db.name}, {stack.read_db.name}, role {stack.role} "
        f"and stream {stack.stream_name}"
    )
    if paused(meta):
        kopf.info(body, reason="Retained", message=f"{PAUSE_ANNOTATION}: {PAUSED}: kept {kept}")
        return "Retained"
    if stack.deletion_policy != "Delete":
        kopf.info(body, reason="Retained", message=f"deletionPolicy=Retain: kept {kept}")
        return "Retained"
    log.info("stack %s/%s: teardown started", stack.namespace, stack.name)
    try:
        dropped, left = await reconcile.teardown(memo.api, stack)
    except Exception as exc:  # any failure, not only ours: the finalizer is held only so long
        why = (
            f"{exc.reason}: {exc.message}"
            if isinstance(exc, ProvisioningError)
            else f"{type(exc).__name__}"  # a foreign error's text may quote a spec value
        )
        if runtime.total_seconds() + backoff(retry) > DELETE_TIMEOUT:
            message = f"gave up after {runtime.total_seconds():.0f} s ({why}); left behind: {kept}"
            # Logged too: a namespace being deleted accepts no new Events.
            logger.warning("CleanupAbandoned: %s", message)
            kopf.warn(body, reason="CleanupAbandoned", message=message)
            return "CleanupAbandoned"
        raise kopf.TemporaryError(why, delay=backoff(retry)) from exc
    if dropped:
        kopf.info(
            body, reason="Dropped", message=f"deletionPolicy=Delete: dropped {', '.join(dropped)}"
        )
    if left:
        kopf.warn(body, reason="LeftBehind", message=f"not dropped: {', '.join(left)}")
    return "LeftBehind" if left else "Dropped"

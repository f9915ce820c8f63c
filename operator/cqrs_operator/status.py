"""Pure status bookkeeping: conditions with transition times, the phase, the Ready summary.

Conditions of a stack:

- ``DatabasesReady``: both databases and the stack's role exist and the schema is migrated.
- ``MigrationsApplied``: the migration Job of the stack's image succeeded and both databases
  are at the schema versions that image expects (``MigrationJobRunning``,
  ``MigrationJobFailed`` with the pod's reason, ``SchemaMismatch``).
- ``StreamReady``: the Redis stream and its consumer group exist.
- ``WorkloadsReady``: the ConfigMap, Secret, Deployments and Services are applied and match
  the spec (what the operator controls).
- ``WorkloadsAvailable``: every Deployment reports, for its current generation, its wanted
  replicas updated and available; when not, the reason comes from its pods
  (``ImagePullBackOff``, ``CrashLoopBackOff``, ...) or is ``RolloutInProgress``.
- ``RedisIsolation``: whether the stack's pods use a Redis ACL user of their own.
- ``CredentialsCurrent``: False while a credential rotation is under way (reasons
  ``RotationPreparing``, ``RotationRollingOut``), True (``Current``) when the pods' login is
  the only one accepted. Not part of Ready: a rotation does not interrupt serving.
- ``ReconciliationPaused``: True while the stack carries ``cqrs.dev/reconcile: paused``
  (nothing of it is changed; the other conditions are as the last reconcile left them),
  False (``ReconciliationResumed``) once reconciled again. Not part of Ready.
- ``Rebuilding``: True while a rebuild Job of a read model runs, its reason the rebuild's
  phase (``Pending``, ``Load``, ``CatchUp``, ``Verify``, ``Swap``, ``Finishing``); False
  after, with the outcome (``Swapped``, ``Failed``, ``Cancelled``, ``RolledBack``; ``Idle``
  before any). Not part of Ready: the live model serves reads and writes throughout
  (rebuild_job.py).
- ``Ready``: all of DatabasesReady, MigrationsApplied, StreamReady, WorkloadsReady and
  WorkloadsAvailable.
- ``ProjectionStalled``: True when the projection makes no progress while there is work (no
  consumer reads the stream, or the group did not move for PROJECTOR_STOPPED_AFTER seconds
  across two reconciles); ``ProjectionDegraded``: True when it progresses but a consumer
  stopped or the oldest unacknowledged entry is older than PROJECTION_LAG_TARGET. Reasons
  and messages come from cqrs_stack.diagnosis; Unknown when the stream cannot be read. Not
  part of Ready: Ready says the stack is provisioned and serving, which it is (reads answer
  from the read model, writes commit); a projection behind is reported beside it, so that
  a rollout or ``kubectl wait --for=condition=Ready`` does not fail on a backlog or on a
  write-DB client holding a transaction open.

Phase: ``Ready``; ``Failed`` when a part cannot succeed without a change of the spec (or of
what it names: a Secret, another stack's object); ``Degraded`` for transient trouble (a
server down) once the stack has been Ready; else ``Provisioning``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PERMANENT_REASONS

if TYPE_CHECKING:
    from cqrs_stack.diagnosis import CatchUpHealth, Judgement, StreamHealth

DATABASES = "DatabasesReady"
MIGRATIONS = "MigrationsApplied"
STREAM = "StreamReady"
WORKLOADS = "WorkloadsReady"
AVAILABLE = "WorkloadsAvailable"
REDIS_ISOLATION = "RedisIsolation"
CREDENTIALS = "CredentialsCurrent"
PROJECTION_STALLED = "ProjectionStalled"
PROJECTION_DEGRADED = "ProjectionDegraded"
PAUSED = "ReconciliationPaused"
REBUILDING = "Rebuilding"
READY = "Ready"
READY_PARTS = (DATABASES, MIGRATIONS, STREAM, WORKLOADS, AVAILABLE)
# Every phase() a stack can be in (the operator exports a count of each, 0 included).
PHASES = ("Provisioning", "Ready", "Degraded", "Failed", "Deleting")
# Reasons of a part that is on its way, not failing.
PENDING_REASONS = (
    "",
    "Pending",
    "Provisioning",
    "RolloutInProgress",
    "WaitingForStream",
    "RotationPreparing",
    "RotationRollingOut",
    "MigrationJobRunning",
    "WaitingForMigrations",
    "WaitingForDatabases",
)
# Container waiting reasons that explain an unavailable Deployment, most telling first.
POD_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    current: Iterable[Mapping[str, Any]],
    updates: Iterable[Condition],
    generation: int | None,
    timestamp: str | None = None,
) -> list[dict[str, Any]]:
    """Return ``current`` with ``updates`` applied; a transition time moves only on change."""
    merged = {c["type"]: dict(c) for c in current if "type" in c}
    stamp = timestamp or now()
    for cond in updates:
        old = merged.get(cond.type, {})
        changed = old.get("status") != cond.status_text
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": stamp if changed else old.get("lastTransitionTime", stamp),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        merged[cond.type] = entry
    return [merged[t] for t in sorted(merged, key=_order)]


def _order(kind: str) -> tuple[int, str]:
    known = (
        *READY_PARTS,
        REDIS_ISOLATION,
        CREDENTIALS,
        PROJECTION_STALLED,
        PROJECTION_DEGRADED,
        REBUILDING,
        READY,
    )
    return (known.index(kind) if kind in known else len(known), kind)


def ready_condition(conditions: Iterable[Mapping[str, Any]]) -> Condition:
    """Summarise the parts: Ready is True when every part is True; else name what is missing."""
    by_type = {c["type"]: c for c in conditions}
    missing = [t for t in READY_PARTS if by_type.get(t, {}).get("status") != "True"]
    if not missing:
        return Condition(
            READY, True, "StackReady", "databases, stream and workloads are ready and serving"
        )
    first = by_type.get(missing[0], {})
    reason = first.get("reason") or "Pending"
    message = f"not ready: {', '.join(missing)}"
    if first.get("message"):
        message += f" ({missing[0]}: {first['message']})"
    return Condition(READY, False, reason, message)


def phase(
    conditions: Iterable[Mapping[str, Any]], deleting: bool = False, was_ready: bool = False
) -> str:
    """One word for people: Deleting, Ready, Failed, Degraded or Provisioning."""
    if deleting:
        return "Deleting"
    by_type = {c["type"]: c for c in conditions}
    if by_type.get(READY, {}).get("status") == "True":
        return "Ready"
    failing = [
        by_type[t].get("reason") or ""
        for t in READY_PARTS
        if by_type.get(t, {}).get("status") == "False"
    ]
    if any(reason in PERMANENT_REASONS for reason in failing):
        return "Failed"
    if any(reason not in PENDING_REASONS for reason in failing) or was_ready:
        return "Degraded"
    return "Provisioning"


def deployment_unavailable(deployment: Mapping[str, Any]) -> str | None:
    """Why ``deployment`` is not serving its wanted replicas yet, or None when it is."""
    meta, spec, st = (
        deployment["metadata"],
        deployment.get("spec") or {},
        deployment.get("status") or {},
    )
    wanted = int(spec.get("replicas", 1))
    name = meta["name"]
    if (st.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return f"{name}: generation {meta.get('generation')} not yet observed"
    updated, available = st.get("updatedReplicas") or 0, st.get("availableReplicas") or 0
    if updated < wanted or available < wanted:
        return f"{name}: {available}/{wanted} available, {updated}/{wanted} updated"
    return None


def rolled_out(deployment: Mapping[str, Any]) -> str | None:
    """Why ``deployment`` still runs pods of an older template, or None when every pod it
    has is of the current one, and available (a credential rotation may then revoke)."""
    why = deployment_unavailable(deployment)
    if why is not None:
        return why
    st = deployment.get("status") or {}
    total, updated = st.get("replicas") or 0, st.get("updatedReplicas") or 0
    if total > updated:
        return f"{deployment['metadata']['name']}: {total - updated} pods of an older template"
    return None


def pod_problem(pods: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The most telling container waiting reason among ``pods``: (reason, "pod: message")."""
    found: list[tuple[int, str, str]] = []
    for pod in pods:
        st = pod.get("status") or {}
        for container in (st.get("initContainerStatuses") or []) + (
            st.get("containerStatuses") or []
        ):
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason") or ""
            if reason in POD_REASONS:
                message = (waiting.get("message") or "")[:200]
                text = f"pod {pod['metadata']['name']}: {reason}" + (
                    f" ({message})" if message else ""
                )
                found.append((POD_REASONS.index(reason), reason, text))
    if not found:
        return None
    _, reason, text = min(found)
    return reason, text


def summary(
    current_status: Mapping[str, Any],
    updates: Iterable[Condition],
    generation: int | None,
    deleting: bool = False,
) -> dict[str, Any]:
    """The status fields to patch: conditions (with Ready), phase, observedGeneration."""
    was_ready = current_status.get("phase") in ("Ready", "Degraded")
    conditions = merge_conditions(current_status.get("conditions") or [], updates, generation)
    conditions = merge_conditions(conditions, [ready_condition(conditions)], generation)
    out: dict[str, Any] = {
        "conditions": conditions,
        "phase": phase(conditions, deleting, was_ready),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def projection_conditions(judgement: Judgement | None, why_unknown: str = "") -> list[Condition]:
    """ProjectionStalled and ProjectionDegraded from a verdict (None: the stream was not read,
    ``why_unknown`` says why)."""
    if judgement is None:
        message = f"the consumer group could not be read: {why_unknown}".rstrip(": ")
        return [
            Condition(PROJECTION_STALLED, None, "StreamUnreadable", message),
            Condition(PROJECTION_DEGRADED, None, "StreamUnreadable", message),
        ]
    stalled, degraded = judgement.verdict == "stalled", judgement.verdict == "degraded"
    return [
        Condition(
            PROJECTION_STALLED,
            stalled,
            judgement.cause if stalled else "Progressing",
            judgement.reason if stalled else "",
        ),
        Condition(
            PROJECTION_DEGRADED,
            degraded,
            judgement.cause if degraded else ("Stalled" if stalled else "KeepsUp"),
            judgement.reason if degraded else ("see ProjectionStalled" if stalled else ""),
        ),
    ]


def projection_health(
    health: StreamHealth, judgement: Judgement, catch_up: CatchUpHealth | None = None
) -> dict[str, Any]:
    """status.projector.health: the verdict and the group's (and sweep's) figures behind it."""
    oldest = health.oldest_pending
    sweep = None
    if catch_up is not None and catch_up.available:
        sweep = {
            "watermark": None if catch_up.watermark is None else str(catch_up.watermark),
            "ageSeconds": catch_up.age_seconds,
            "pinnedBy": [
                {
                    "xid": str(pin.xid),
                    "pid": pin.pid,
                    "applicationName": pin.application_name,
                    "state": pin.state,
                    "openSeconds": pin.open_seconds,
                }
                for pin in catch_up.pinned_by
            ],
        }
    return {
        "catchUp": sweep,
        "verdict": judgement.verdict,
        "reason": judgement.reason,
        "lagEvents": health.lag_events,
        "lagSeconds": health.lag_seconds,
        "oldestPending": None
        if oldest is None
        else {
            "id": oldest.entry_id,
            "ageSeconds": oldest.age_seconds,
            "consumer": oldest.consumer,
            "deliveries": oldest.deliveries,
        },
        "consumers": len(health.consumers),
        "stoppedConsumers": [c.name for c in health.stopped],
    }

"""Pure status bookkeeping: conditions with transition times, the phase, the Ready summary.

Conditions of a stack:

- ``DatabasesReady``: both databases and the stack's role exist and the schema is migrated.
- ``StreamReady``: the Redis stream and its consumer group exist.
- ``WorkloadsReady``: the ConfigMap, Secret, Deployments and Services are applied and match
  the spec (what the operator controls). It does not wait for pods to run.
- ``WorkloadsAvailable``: every Deployment reports its wanted replicas available (needs a
  kubelet and the Deployment controller; informational, not part of Ready).
- ``Ready``: DatabasesReady and StreamReady and WorkloadsReady.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DATABASES = "DatabasesReady"
STREAM = "StreamReady"
WORKLOADS = "WorkloadsReady"
AVAILABLE = "WorkloadsAvailable"
READY = "Ready"
READY_PARTS = (DATABASES, STREAM, WORKLOADS)


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
    known = (*READY_PARTS, AVAILABLE, READY)
    return (known.index(kind) if kind in known else len(known), kind)


def ready_condition(conditions: Iterable[Mapping[str, Any]]) -> Condition:
    """Summarise the parts: Ready is True when every part is True; else name what is missing."""
    by_type = {c["type"]: c for c in conditions}
    missing = [t for t in READY_PARTS if by_type.get(t, {}).get("status") != "True"]
    if not missing:
        return Condition(READY, True, "StackReady", "databases, stream and workloads are ready")
    first = by_type.get(missing[0], {})
    reason = first.get("reason") or "Pending"
    message = f"not ready: {', '.join(missing)}"
    if first.get("message"):
        message += f" ({missing[0]}: {first['message']})"
    return Condition(READY, False, reason, message)


def phase(conditions: Iterable[Mapping[str, Any]], deleting: bool = False) -> str:
    """One word for people: Deleting, Ready, Failed (a part reports False) or Provisioning."""
    if deleting:
        return "Deleting"
    by_type = {c["type"]: c.get("status") for c in conditions}
    if by_type.get(READY) == "True":
        return "Ready"
    if any(
        by_type.get(t) == "False" and _is_failure(c)
        for t in READY_PARTS
        for c in conditions
        if c.get("type") == t
    ):
        return "Failed"
    return "Provisioning"


def _is_failure(condition: Mapping[str, Any]) -> bool:
    return condition.get("reason") not in (None, "", "Pending", "Provisioning")


def summary(
    current_status: Mapping[str, Any],
    updates: Iterable[Condition],
    generation: int | None,
    deleting: bool = False,
) -> dict[str, Any]:
    """The status fields to patch: conditions (with Ready), phase, observedGeneration."""
    conditions = merge_conditions(current_status.get("conditions") or [], updates, generation)
    conditions = merge_conditions(conditions, [ready_condition(conditions)], generation)
    out: dict[str, Any] = {"conditions": conditions, "phase": phase(conditions, deleting)}
    if generation is not None:
        out["observedGeneration"] = generation
    return out

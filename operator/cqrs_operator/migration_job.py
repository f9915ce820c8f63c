"""Pure: what a stack's migration Job says, and which image the Deployments may run.

Migrations come from the stack's own image: a Job ``cqrs-stack migrate`` of that image runs
before any pod of it starts. Until it succeeded the Deployments keep the image they ran
(``status.databases.migratedImage``); a stack that never ran one waits.

The Job reports in its container's termination message (``MIGRATE_REPORT_FILE``): the
versions both databases are at and the versions the image expects. An image that writes no
report (one older than the report) is taken to expect what its successful run left: it
applied every migration it carries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import status

RUNNING, SUCCEEDED, FAILED = "Running", "Succeeded", "Failed"
DATABASE_KINDS = ("write", "read")
MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class JobOutcome:
    """Where a migration Job is: RUNNING, SUCCEEDED or FAILED, why, and its report."""

    phase: str
    message: str = ""
    expected: dict[str, int] | None = None  # the image's schema versions, from the report
    reason: str = ""  # why a running Job's pod cannot start (ImagePullBackOff, ...)


def parse_report(text: str | None) -> dict[str, int] | None:
    """The ``expectedSchemaVersions`` of a migration report, or None when it is not one."""
    try:
        report = json.loads(text or "")
        expected = report["expectedSchemaVersions"]
        versions = {k: expected[k] for k in DATABASE_KINDS}
    except (ValueError, TypeError, KeyError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions.values()):
        return None
    return versions


def _terminated(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(pod name, terminated state) of every finished container, newest pod last."""
    found: list[tuple[str, str, Mapping[str, Any]]] = []
    for pod in pods:
        meta, st = pod.get("metadata") or {}, pod.get("status") or {}
        for container in st.get("containerStatuses") or []:
            state = (container.get("state") or {}).get("terminated")
            if state:
                found.append(
                    (str(meta.get("creationTimestamp") or ""), meta.get("name", ""), state)
                )
    found.sort(key=lambda f: f[0])
    return [(name, state) for _, name, state in found]


def _failure(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> str:
    """Why the Job failed: its condition's reason and the last pod's reason and message."""
    cond: Mapping[str, Any] = next(
        (c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == "Failed"),
        {},
    )
    text = f"Job {job['metadata']['name']} failed ({cond.get('reason') or 'Failed'})"
    finished = _terminated(pods)
    if finished:
        name, state = finished[-1]
        detail = " ".join(str(state.get("message") or "").split())
        text += (
            f": pod {name}: {state.get('reason') or 'Error'}, exit code {state.get('exitCode')}"
            + (f": {detail}" if detail else "")
        )
    elif cond.get("message"):
        text += f": {cond['message']}"
    return text[:MESSAGE_LIMIT]


def job_outcome(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> JobOutcome:
    """The outcome of migration Job ``job`` (a dict) with its ``pods``."""
    pods = list(pods)
    st = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    if conditions.get("Failed") == "True":
        return JobOutcome(FAILED, _failure(job, pods))
    if conditions.get("Complete") == "True" or (st.get("succeeded") or 0) >= 1:
        reports = [parse_report(state.get("message")) for _, state in _terminated(pods)]
        expected = next((r for r in reversed(reports) if r is not None), None)
        return JobOutcome(SUCCEEDED, f"Job {job['metadata']['name']} succeeded", expected)
    problem = status.pod_problem(pods)
    if problem is not None:  # a pod that cannot start: the Job would wait for its deadline
        return JobOutcome(
            RUNNING, f"Job {job['metadata']['name']}: {problem[1]}", reason=problem[0]
        )
    active = st.get("active") or 0
    return JobOutcome(RUNNING, f"Job {job['metadata']['name']} running ({active} pod active)")


def recorded_migration(status: Mapping[str, Any]) -> tuple[str | None, dict[str, int] | None]:
    """(image, expected versions) of the last successful migration the status records."""
    dbs = status.get("databases") or {}
    image = dbs.get("migratedImage")
    expected = dbs.get("expectedSchemaVersions")
    if not isinstance(image, str) or not image:
        return None, None
    if not isinstance(expected, Mapping) or set(DATABASE_KINDS) - set(expected):
        return image, None
    return image, {k: int(expected[k]) for k in DATABASE_KINDS}


def split_image(image: str) -> tuple[str, str]:
    """``repository:tag`` split at the last colon after the last slash (a registry port)."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon <= slash:
        return image, "latest"
    return image[:colon], image[colon + 1 :]

"""Pure: when a stack's read model is rebuilt, the Job that does it, and what its run says.

A read model is rebuilt by a Job of the stack's own image, ``cqrs-stack rebuild --model M
--version N --run-id <the Job's name>``: it builds version N beside the live one and swaps
it in (``cqrs_stack.rebuild``), recording its progress in the read DB's ``rebuild_runs``
under its run id. The operator runs one such Job at a time per stack:

- a model whose spec version is above its live version (``read_model_versions`` in the read
  DB, shown as ``status.readModels[].version``) is rebuilt at the spec's version;
- a new value of the annotation ``cqrs.dev/rebuild`` rebuilds every enabled model at its
  version (the spec's, or the live one when that is higher), once per value;
- a model's last run is never started again for the same version and annotation value: a
  failed or cancelled rebuild waits for a new version or a new annotation value;
- a running Job whose model left the spec, or whose version is no longer the spec's, is
  cancelled (deleted); so is one a person deletes. Either way the live model is untouched
  (a rebuild changes it only by its swap).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cqrs_stack.rebuild_progress import INITIAL_VERSION, RunProgress

from . import manifests, migration_job, status
from .spec import StackSpec

# A new value (any) of this annotation rebuilds every enabled model once.
REBUILD_ANNOTATION = "cqrs.dev/rebuild"
REBUILD = "rebuild"
JOB_LABEL = "cqrs.dev/rebuild-job"
MODEL_ANNOTATION = "cqrs.dev/rebuild-model"
VERSION_ANNOTATION = "cqrs.dev/rebuild-version"
REQUEST_ANNOTATION = "cqrs.dev/rebuild-request"
# A rebuild is not retried by the Job controller: a failure is reported, and a new version or
# annotation value runs it again. Its deadline is the rebuild's own bound on its bulk steps.
REBUILD_BACKOFF_LIMIT = 0
REBUILD_DEADLINE_SECONDS = 6 * 3600

RUNNING, SWAPPED, FAILED, CANCELLED, ROLLED_BACK = (
    "Running",
    "Swapped",
    "Failed",
    "Cancelled",
    "RolledBack",
)
FINISHED = (SWAPPED, FAILED, CANCELLED, ROLLED_BACK)
# Condition Rebuilding's reason: the run's phase while it works (Pending before its first
# record, Finishing once it recorded its end and its pod exits), its outcome after.
PHASE_REASONS = {"load": "Load", "catch-up": "CatchUp", "verify": "Verify", "swap": "Swap"}
PENDING = "Pending"
IDLE = "Idle"
# A status or Event message at most (the Job's failure, the rebuild's error, what to do).
MESSAGE_LIMIT = 1000


@dataclass(frozen=True)
class Run:
    """One rebuild: a model built at a version, for an annotation value ("" for a version)."""

    model: str
    version: int
    request: str = ""


@dataclass(frozen=True)
class LastRun:
    """A model's last rebuild Job, as the stack's status records it."""

    job: str
    version: int
    request: str
    outcome: str


# ------------------------------------------------------------------ what the status records


def recorded_live(current_status: Mapping[str, Any]) -> dict[str, int]:
    """Each model's live version as the status last recorded it."""
    out: dict[str, int] = {}
    for entry in current_status.get("readModels") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("version"), int):
            out[str(entry.get("name"))] = int(entry["version"])
    return out


def recorded_runs(current_status: Mapping[str, Any]) -> dict[str, LastRun]:
    """Each model's last rebuild Job as the status records it."""
    out: dict[str, LastRun] = {}
    for entry in current_status.get("readModels") or []:
        last = entry.get("lastRun") if isinstance(entry, Mapping) else None
        if not isinstance(last, Mapping) or not last.get("job"):
            continue
        out[str(entry.get("name"))] = LastRun(
            job=str(last["job"]),
            version=int(last.get("version") or 0),
            request=str(last.get("request") or ""),
            outcome=str(last.get("outcome") or ""),
        )
    return out


def handled_request(current_status: Mapping[str, Any], request: str) -> str:
    """The annotation value whose rebuilds were run. A stack whose read models were never
    recorded (a new one) takes the value it has as handled: its read models are built from
    the start, a rebuild adds nothing."""
    if "readModels" not in current_status:
        return request
    return str(current_status.get("rebuildRequest") or "")


# ------------------------------------------------------------------ deciding


def _attempted(last: LastRun | None, run: Run) -> bool:
    return last is not None and (last.version, last.request) == (run.version, run.request)


def plan(
    models: Sequence[tuple[str, int]],
    live: Mapping[str, int],
    last: Mapping[str, LastRun],
    request: str,
    handled: str,
) -> Run | None:
    """The next rebuild to run, or None: versions above the live one first (in spec order),
    then the annotation's value; never a run a model already had."""
    for name, version in models:
        run = Run(name, version)
        if version > live.get(name, INITIAL_VERSION) and not _attempted(last.get(name), run):
            return run
    if request and request != handled:
        for name, version in models:
            run = Run(name, max(version, live.get(name, INITIAL_VERSION)), request)
            if not _attempted(last.get(name), run):
                return run
    return None


def still_wanted(run: Run, models: Sequence[tuple[str, int]]) -> bool:
    """Whether a running rebuild still builds what the spec asks: its model enabled, and
    (for a version's rebuild) at the spec's version. A version changed back (or on) cancels."""
    versions = dict(models)
    if run.model not in versions:
        return False
    return bool(run.request) or versions[run.model] == run.version


def job_name(spec: StackSpec, run: Run, previous: str = "") -> str:
    """``<stack>-rebuild-<digest>``: one name per run and per model's previous Job (a run
    repeated after others gets a new name, so its run id is new), a DNS label (63)."""
    key = "\0".join((run.model, str(run.version), run.request, previous))
    digest = hashlib.sha256(key.encode()).hexdigest()
    stem = manifests.child_name(spec, REBUILD) + "-"
    return stem + digest[: max(4, min(10, 63 - len(stem)))]


def job_selector(spec: StackSpec) -> dict[str, str]:
    """The labels of the stack's rebuild Jobs (and of their pods)."""
    return manifests.selector_labels(spec, REBUILD)


def rebuild_job(spec: StackSpec, run: Run, name: str) -> manifests.Manifest:
    """The Job of the stack's image that rebuilds ``run.model`` at ``run.version``, run id
    ``name``: the migration Job's shape (database URLs only, spec.migrationJob's pod controls)."""
    job = manifests.stack_job(
        spec,
        REBUILD,
        name,
        [REBUILD, "--model", run.model, "--version", str(run.version), "--run-id", name],
        [{"name": "READ_MODELS", "value": ",".join(spec.read_models)}],
        pod_label=JOB_LABEL,
        backoff_limit=REBUILD_BACKOFF_LIMIT,
        deadline_seconds=REBUILD_DEADLINE_SECONDS,
    )
    job["metadata"]["annotations"] = {
        manifests.IMAGE_ANNOTATION: spec.image,
        MODEL_ANNOTATION: run.model,
        VERSION_ANNOTATION: str(run.version),
        REQUEST_ANNOTATION: run.request,
    }
    return job


def run_of(job: Mapping[str, Any]) -> Run | None:
    """The run a rebuild Job does, from its annotations (None: not a Job of ours)."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    try:
        return Run(
            str(annotations[MODEL_ANNOTATION]),
            int(annotations[VERSION_ANNOTATION]),
            str(annotations.get(REQUEST_ANNOTATION) or ""),
        )
    except (KeyError, ValueError):
        return None


def finished(job: Mapping[str, Any]) -> bool:
    """Whether the Job controller marked ``job`` Complete or Failed."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
    )


def pods_active(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """The rebuild pods still running (a cancelled Job's pod until it stopped)."""
    return [
        str(p["metadata"]["name"])
        for p in pods
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]


# ------------------------------------------------------------------ a run's outcome


def outcome(
    job_state: migration_job.JobOutcome,
    progress: RunProgress | None,
    live_version: int | None,
    run: Run,
) -> tuple[str, str]:
    """(outcome, message) of a rebuild Job: RUNNING until the Job ended, then what its row
    in rebuild_runs says (a Job that succeeded without recording a swap did not swap; one
    whose record stayed at its swap swapped if its version is live)."""
    phase = progress.phase if progress is not None else None
    error = f"; the rebuild reported: {progress.error}" if progress and progress.error else ""
    if job_state.phase == migration_job.RUNNING:
        return RUNNING, job_state.message
    if phase == "cancelled":
        return CANCELLED, f"{job_state.message}: cancelled{error}"
    if phase == "rolled-back":
        return ROLLED_BACK, f"{job_state.message}: the rebuild rolled back{error}"
    # A Job that ended with its record at the swap (lost in its COMMIT, exit 1: it could not
    # tell) swapped exactly when its version is live.
    if phase == "done" or (
        live_version == run.version
        and (job_state.phase == migration_job.SUCCEEDED or phase == "swap")
    ):
        return SWAPPED, f"{job_state.message}: version {run.version} of {run.model} is live"
    if job_state.phase == migration_job.FAILED:
        return FAILED, f"{job_state.message}{error}"
    return FAILED, (
        f"{job_state.message}, but the read DB records no swap of {run.model} to version "
        f"{run.version}{error}"
    )


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def rebuild_status(
    run: Run, job: str, result: str, progress: RunProgress | None, message: str
) -> dict[str, Any]:
    """``status.rebuild``: the run, its outcome and its progress as the read DB records it
    (fields not known are None, so a merge patch removes an older run's)."""
    rate = progress.rate if progress is not None else None
    eta = progress.eta_seconds if progress is not None else None
    return {
        "models": [run.model],
        "version": run.version,
        "job": job,
        "phase": progress.phase if progress is not None else PENDING.lower(),
        "outcome": result,
        "done": progress.done if progress is not None else None,
        "total": progress.total if progress is not None else None,
        "percent": round(progress.percent, 1) if progress is not None else None,
        "commandsPerSecond": None if rate is None else round(rate, 1),
        "etaSeconds": None if eta is None else round(eta, 1),
        "startedAt": _stamp(progress.started_at) if progress is not None else None,
        "finishedAt": _stamp(progress.finished_at) if progress is not None else None,
        "message": message[:MESSAGE_LIMIT],
    }


def condition(result: str | None, phase: str | None, message: str) -> status.Condition:
    """Condition Rebuilding: True while a Job runs (reason: its phase), else False with the
    last run's outcome (Idle before any)."""
    if result == RUNNING:
        # A run recorded as ended whose Job has not yet: its pod is exiting.
        reason = PHASE_REASONS.get(phase or "", "Finishing" if phase else PENDING)
        return status.Condition(status.REBUILDING, True, reason, message)
    return status.Condition(status.REBUILDING, False, result or IDLE, message)


def describe_live(models: Sequence[tuple[str, int]], live: Mapping[str, int]) -> str:
    """``records=2 history=1``: each enabled model's live version."""
    return " ".join(f"{name}={live.get(name, INITIAL_VERSION)}" for name, _ in models)

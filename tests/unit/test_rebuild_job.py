"""The rebuild Job's pure part: which run is next, which running one is cancelled, the Job's
name and shape, and what a finished Job and its run's record say. Milliseconds."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from cqrs_operator import manifests, migration_job, rebuild_job
from cqrs_operator.rebuild_job import CANCELLED, FAILED, RUNNING, SWAPPED, LastRun, Run
from cqrs_operator.spec import parse_spec
from cqrs_stack.rebuild_progress import RunProgress

TWO = (("records", 1), ("history", 1))


def stack(name: str = "orders", **spec: Any) -> Any:
    body = {
        "databases": {
            "write": {"host": "pg", "adminSecret": "a"},
            "read": {"host": "pg", "adminSecret": "a"},
        },
        "redis": {"url": "redis://r:6379/0"},
        **spec,
    }
    return parse_spec(body, namespace="shop", name=name, uid="u1")


def test_nothing_to_do_at_the_live_versions() -> None:
    assert rebuild_job.plan(TWO, {"records": 1, "history": 1}, {}, "", "") is None
    # A model the read DB does not list is at the version its migrations create.
    assert rebuild_job.plan(TWO, {}, {}, "", "") is None
    # Below the live one (a rollback by hand): nothing is rebuilt down.
    assert rebuild_job.plan((("records", 1),), {"records": 3}, {}, "", "") is None


def test_a_version_above_the_live_one_is_next_in_spec_order() -> None:
    models = (("records", 2), ("history", 3))
    assert rebuild_job.plan(models, {}, {}, "", "") == Run("records", 2)
    done = {"records": LastRun("j1", 2, "", SWAPPED)}
    assert rebuild_job.plan(models, {"records": 2}, done, "", "") == Run("history", 3)


@pytest.mark.parametrize("outcome", [FAILED, CANCELLED, SWAPPED, RUNNING])
def test_a_run_is_never_started_twice_for_one_version(outcome: str) -> None:
    last = {"records": LastRun("j1", 2, "", outcome)}
    assert rebuild_job.plan((("records", 2),), {"records": 1}, last, "", "") is None
    # A new version (one past the attempted) runs.
    assert rebuild_job.plan((("records", 3),), {"records": 1}, last, "", "") == Run("records", 3)
    # A new annotation value retries the same version.
    assert rebuild_job.plan((("records", 2),), {"records": 1}, last, "x", "") == Run(
        "records", 2, "x"
    )


def test_the_annotation_rebuilds_every_model_once_per_value() -> None:
    live = {"records": 1, "history": 4}
    assert rebuild_job.plan(TWO, live, {}, "v1", "v1") is None  # handled
    assert rebuild_job.plan(TWO, live, {}, "v1", "") == Run("records", 1, "v1")
    first = {"records": LastRun("j1", 1, "v1", SWAPPED)}
    # At the live version where that is above the spec's.
    assert rebuild_job.plan(TWO, live, first, "v1", "") == Run("history", 4, "v1")
    both = {**first, "history": LastRun("j2", 4, "v1", FAILED)}
    assert rebuild_job.plan(TWO, live, both, "v1", "") is None


def test_a_new_stack_takes_its_annotation_as_handled() -> None:
    assert rebuild_job.handled_request({}, "v1") == "v1"
    assert rebuild_job.handled_request({"readModels": []}, "v1") == ""
    recorded = {"readModels": [], "rebuildRequest": "v0"}
    assert rebuild_job.handled_request(recorded, "v1") == "v0"


def test_a_running_rebuild_is_cancelled_when_the_spec_no_longer_wants_it() -> None:
    assert rebuild_job.still_wanted(Run("records", 2), (("records", 2),))
    assert not rebuild_job.still_wanted(Run("records", 2), (("records", 1),))  # changed back
    assert not rebuild_job.still_wanted(Run("records", 2), (("records", 3),))  # bumped on
    assert not rebuild_job.still_wanted(Run("history", 1, "x"), (("records", 1),))  # disabled
    assert rebuild_job.still_wanted(Run("records", 1, "x"), (("records", 2),))  # on request


@pytest.mark.parametrize("length", [1, 50])
def test_job_names_are_dns_labels_and_new_per_run(length: int) -> None:
    spec = stack("a" * length)
    names = {
        rebuild_job.job_name(spec, Run("records", 2)),
        rebuild_job.job_name(spec, Run("records", 3)),
        rebuild_job.job_name(spec, Run("history", 2)),
        rebuild_job.job_name(spec, Run("records", 2, "x")),
        rebuild_job.job_name(spec, Run("records", 2), previous="orders-rebuild-1"),
    }
    assert len(names) == 5
    assert all(len(n) <= 63 and n.startswith(f"{spec.name}-rebuild-") for n in names)
    assert rebuild_job.job_name(spec, Run("records", 2)) in names  # the same inputs, one name


def test_the_rebuild_job_is_the_migration_jobs_shape_with_the_rebuild_command() -> None:
    spec = stack(
        readModels=[{"name": "records", "version": 2}, {"name": "history"}],
        migrationJob={
            "nodeSelector": {"pool": "batch"},
            "envFrom": [{"secretRef": {"name": "extra"}}],
            "resources": {"limits": {"memory": "1Gi"}},
        },
    )
    job = rebuild_job.rebuild_job(spec, Run("records", 2), "orders-rebuild-abc")
    migrate = manifests.migration_job(spec)
    pod, mpod = job["spec"]["template"]["spec"], migrate["spec"]["template"]["spec"]
    [container], [mcontainer] = pod["containers"], mpod["containers"]
    assert container["args"] == [
        "rebuild",
        "--model",
        "records",
        "--version",
        "2",
        "--run-id",
        "orders-rebuild-abc",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["READ_MODELS"]["value"] == "records,history"
    assert "REDIS_URL" not in env and "MIGRATE_REPORT_FILE" not in env
    # The same pod controls, Secrets and resources as the migration Job.
    for key in ("nodeSelector", "securityContext", "volumes", "restartPolicy"):
        assert pod[key] == mpod[key], key
    for key in ("envFrom", "resources", "securityContext", "image", "volumeMounts"):
        assert container[key] == mcontainer[key], key
    assert {e["name"] for e in mcontainer["env"]} - {"MIGRATE_REPORT_FILE"} < set(env)
    assert job["spec"]["backoffLimit"] == rebuild_job.REBUILD_BACKOFF_LIMIT == 0
    assert job["spec"]["activeDeadlineSeconds"] == rebuild_job.REBUILD_DEADLINE_SECONDS
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[rebuild_job.JOB_LABEL] == "orders-rebuild-abc"
    assert rebuild_job.job_selector(spec).items() <= job["metadata"]["labels"].items()
    assert rebuild_job.run_of(job) == Run("records", 2)


def progress(phase: str, done: int = 10, total: int = 10, error: str | None = None) -> RunProgress:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    return RunProgress(
        run_id="j",
        models=("records",),
        version=2,
        phase=phase,
        done=done,
        total=total,
        started_at=start,
        updated_at=start + datetime.timedelta(seconds=5),
        finished_at=None if phase in ("load", "catch-up") else start,
        error=error,
    )


RUN = Run("records", 2)
JOB_RUNNING = migration_job.JobOutcome(migration_job.RUNNING, "Job j running")
JOB_DONE = migration_job.JobOutcome(migration_job.SUCCEEDED, "Job j succeeded")
JOB_FAILED = migration_job.JobOutcome(migration_job.FAILED, "Job j failed: exit code 1")


@pytest.mark.parametrize(
    ("job", "phase", "live", "expected"),
    [
        (JOB_RUNNING, "done", 2, RUNNING),  # its pod is exiting
        (JOB_DONE, "done", 2, SWAPPED),
        (JOB_DONE, None, 2, SWAPPED),  # no record, yet the version is live
        (JOB_DONE, None, 1, FAILED),  # succeeded without a swap
        (JOB_FAILED, "failed", 1, FAILED),
        (JOB_FAILED, "cancelled", 1, CANCELLED),  # SIGTERM: exit 130, recorded as cancelled
        (JOB_DONE, "rolled-back", 1, rebuild_job.ROLLED_BACK),
        # Lost in its swap's COMMIT (exit 1, record left at swap): the live version decides.
        (JOB_FAILED, "swap", 2, SWAPPED),
        (JOB_FAILED, "swap", 1, FAILED),
    ],
)
def test_a_jobs_outcome_comes_from_the_job_and_its_runs_record(
    job: migration_job.JobOutcome, phase: str | None, live: int, expected: str
) -> None:
    record = None if phase is None else progress(phase, error="boom" if phase == "failed" else None)
    result, message = rebuild_job.outcome(job, record, live, RUN)
    assert result == expected
    if phase == "failed":
        assert "boom" in message


def test_status_shows_the_runs_progress_and_clears_what_is_unknown() -> None:
    shown = rebuild_job.rebuild_status(RUN, "j", RUNNING, progress("catch-up", 50, 200), "m")
    assert shown["percent"] == 25.0 and shown["commandsPerSecond"] == 10.0
    assert shown["etaSeconds"] == 15.0 and shown["startedAt"] == "2026-01-01T00:00:00Z"
    pending = rebuild_job.rebuild_status(RUN, "j", RUNNING, None, "m")
    assert pending["phase"] == "pending" and pending["done"] is None  # merge patch: removed
    assert rebuild_job.condition(RUNNING, "catch-up", "m").reason == "CatchUp"
    assert rebuild_job.condition(RUNNING, None, "m").reason == "Pending"
    assert rebuild_job.condition(None, None, "m").reason == "Idle"
    failed = rebuild_job.condition(FAILED, "failed", "m")
    assert (failed.status, failed.reason) == (False, "Failed")

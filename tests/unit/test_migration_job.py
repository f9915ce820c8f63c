"""The migration Job's outcome and the image the Deployments run: pure, no cluster."""

from __future__ import annotations

import json
from typing import Any

from cqrs_operator import migration_job


def job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "orders-migrate-1a2b3c4d"}, "status": status}


def pod(name: str, created: str, **terminated: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"containerStatuses": [{"state": {"terminated": terminated}}]},
    }


REPORT = json.dumps({"expectedSchemaVersions": {"write": 3, "read": 3}, "applied": 2})


def test_a_report_gives_the_versions_the_image_expects() -> None:
    assert migration_job.parse_report(REPORT) == {"write": 3, "read": 3}
    for bad in ("", "applied write/0001", "{}", '{"expectedSchemaVersions": {"write": 3}}'):
        assert migration_job.parse_report(bad) is None, bad
    assert (
        migration_job.parse_report('{"expectedSchemaVersions": {"write": true, "read": 1}}') is None
    )


def test_succeeded_job_reads_the_report_of_its_pod() -> None:
    done = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    outcome = migration_job.job_outcome(done, [pod("p1", "t1", exitCode=0, message=REPORT)])
    assert (outcome.phase, outcome.expected) == (migration_job.SUCCEEDED, {"write": 3, "read": 3})
    # An image older than the report writes none: success, expected unknown (taken from the DB).
    assert migration_job.job_outcome(done, [pod("p1", "t1", exitCode=0)]).expected is None


def test_failed_job_names_the_last_pods_reason_bounded() -> None:
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}])
    pods = [
        pod("p2", "2026-01-01T00:00:02Z", exitCode=4, reason="Error", message="cannot reach"),
        pod("p1", "2026-01-01T00:00:01Z", exitCode=1, reason="Error", message="first"),
    ]
    outcome = migration_job.job_outcome(failed, pods)
    assert outcome.phase == migration_job.FAILED
    assert outcome.message == (
        "Job orders-migrate-1a2b3c4d failed (DeadlineExceeded): pod p2: Error, exit code 4: "
        "cannot reach"
    )
    long = migration_job.job_outcome(failed, [pod("p", "t", exitCode=1, message="x " * 1000)])
    assert len(long.message) == migration_job.MESSAGE_LIMIT


def test_job_without_terminal_condition_is_running() -> None:
    assert migration_job.job_outcome(job(active=1), []).phase == migration_job.RUNNING
    assert migration_job.job_outcome(job(), []).phase == migration_job.RUNNING


def test_recorded_migration_and_image_split() -> None:
    status = {
        "databases": {"migratedImage": "r:1", "expectedSchemaVersions": {"write": 3, "read": 2}}
    }
    assert migration_job.recorded_migration(status) == ("r:1", {"write": 3, "read": 2})
    assert migration_job.recorded_migration({}) == (None, None)
    assert migration_job.split_image("registry:5000/team/cqrs-stack:0.2.0") == (
        "registry:5000/team/cqrs-stack",
        "0.2.0",
    )
    assert migration_job.split_image("registry:5000/cqrs-stack") == (
        "registry:5000/cqrs-stack",
        "latest",
    )

"""Read-model rebuilds driven by the stack, against the real API server with the operator
running as the chart's ServiceAccount.

No kubelet runs here: ``kubelet_standin`` runs a rebuild Job's command (this tree's
``cqrs-stack rebuild --model M --version N --run-id <Job>``) against the test's PostgreSQL
servers and records the Job's outcome, or records a failure without running anything. A
run's progress mid-way is played by writing its row in ``rebuild_runs``, as the rebuild does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from kubernetes_asyncio import client

from tests.operator.fixtures_operator import (
    PERMISSION_DENIED,
    ChartRbac,
    Env,
    World,
    events,
    wait_event,
    wait_until,
)
from tests.operator.kubelet_standin import fail_jobs, run_jobs

COMMANDS = 300
# Reconciles run every 2 s here (CQRS_OPERATOR_STATUS_INTERVAL): a Job the operator would
# wrongly start again shows within this.
SETTLE = 5.0
TWO_MODELS = [{"name": "records"}, {"name": "history"}]


@pytest.fixture
def env(world: World, chart_rbac: ChartRbac) -> Iterator[Env]:
    """The test's world, the operator running with the chart's ServiceAccount and RBAC; at the
    end its log shows no refused call."""
    operator = world.start_operator(kubeconfig=chart_rbac.kubeconfig)
    yield world.running(operator)
    assert not PERMISSION_DENIED.search(operator.log_text()), operator.log_tail()


# ------------------------------------------------------------------ helpers


async def rebuild_jobs(env: Env, stack: str) -> list[Any]:
    selector = f"app.kubernetes.io/instance={stack},app.kubernetes.io/component=rebuild"
    listed = await client.BatchV1Api(env.api).list_namespaced_job(
        env.namespace, label_selector=selector
    )
    return sorted(listed.items, key=lambda j: j.metadata.creation_timestamp)


def unfinished(jobs: list[Any]) -> list[Any]:
    return [
        j
        for j in jobs
        if not any(
            c.type in ("Complete", "Failed") and c.status == "True"
            for c in (j.status.conditions or [])
        )
    ]


async def wait_job(env: Env, stack: str, count: int) -> Any:
    """Wait until the stack has ``count`` rebuild Jobs; the newest."""

    async def created() -> Any:
        jobs = await rebuild_jobs(env, stack)
        return jobs[-1] if len(jobs) == count else None

    return await wait_until(
        created, timeout=30, what=f"rebuild Job #{count}", alive=env.operator.exit_reason
    )


async def database(server: Any, name: str) -> asyncpg.Connection:
    return await asyncpg.connect(server.url(name))


async def seed(env: Env, count: int) -> None:
    """``count`` commands in the write DB (the rebuild's source), as the write API stores."""
    conn = await database(env.write_pg, f"w_{env.fresh}")
    try:
        await conn.execute(
            "INSERT INTO commands (key, value, event_type) SELECT 'k' || i, 'v' || i,"
            " 'RecordCreated' FROM generate_series(1, $1) AS i",
            count,
        )
    finally:
        await conn.close()


async def read_db(env: Env, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await database(env.read_pg, f"r_{env.fresh}")
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def status_of(env: Env, stack: str) -> dict[str, Any]:
    obj = await env.stacks.get(stack)
    return dict((obj or {}).get("status") or {})


async def wait_status(env: Env, stack: str, what: str, check: Any) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        st = await status_of(env, stack)
        return st if check(st) else None

    result: dict[str, Any] = await wait_until(
        reached, timeout=30, what=what, alive=env.operator.exit_reason
    )
    return result


def rebuilding(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Rebuilding"), {})


def ready(st: dict[str, Any]) -> str:
    return next((c["status"] for c in st.get("conditions") or [] if c["type"] == "Ready"), "")


def live(st: dict[str, Any]) -> dict[str, int]:
    return {m["name"]: m["version"] for m in st.get("readModels") or []}


async def bump(env: Env, stack: str, models: list[dict[str, Any]]) -> None:
    await env.stacks.patch(stack, {"spec": {"readModels": models}})


async def annotate(env: Env, stack: str, value: str) -> None:
    await env.stacks.patch(stack, {"metadata": {"annotations": {"cqrs.dev/rebuild": value}}})


async def ready_stack(env: Env, name: str, **spec: Any) -> dict[str, Any]:
    await env.stacks.create(env.manifest(name, **spec))
    obj = await env.stacks.wait_ready(name, env.operator)
    st = await wait_status(env, name, "readModels in status", lambda s: "readModels" in s)
    assert rebuilding(st)["status"] == "False" and rebuilding(st)["reason"] == "Idle", st
    return obj


# ------------------------------------------------------------------ the tests


async def test_a_version_above_the_live_one_runs_one_job_reports_progress_and_swaps(
    env: Env,
) -> None:
    await ready_stack(
        env, "rb", readModels=TWO_MODELS, migrationJob={"nodeSelector": {"pool": "batch"}}
    )
    assert live(await status_of(env, "rb")) == {"records": 1, "history": 1}
    await seed(env, COMMANDS)

    await bump(env, "rb", [{"name": "records", "version": 2}, {"name": "history"}])
    job = await wait_job(env, "rb", 1)
    name = job.metadata.name
    container = job.spec.template.spec.containers[0]
    assert container.image == "cqrs-stack:0.1.0"
    assert container.args == ["rebuild", "--model", "records", "--version", "2", "--run-id", name]
    env_vars = {e.name: e for e in container.env}
    assert env_vars["READ_MODELS"].value == "records,history"
    assert {"WRITE_DB_URL", "READ_DB_URL"} <= set(env_vars) and "REDIS_URL" not in env_vars
    assert env_vars["READ_DB_URL"].value_from.secret_key_ref.name == "rb-credentials"
    # The migration Job's pod controls (spec.migrationJob), one pod, never retried by itself.
    assert job.spec.template.spec.node_selector == {"pool": "batch"}
    assert (job.spec.backoff_limit, job.spec.template.spec.restart_policy) == (0, "Never")
    assert job.metadata.owner_references[0].kind == "CqrsStack"
    started = await wait_event(env.api, env.namespace, "rb", "RebuildStarted", env.operator)
    assert name in started.message and "version 2" in started.message

    # Mid-way, as the rebuild records it: 150 of 300 commands in 10 s.
    await read_db(
        env,
        "INSERT INTO rebuild_runs (run_id, models, version, phase, done, total, started_at,"
        " updated_at) VALUES ($1, '{records}', 2, 'catch-up', 150, 300,"
        " now() - interval '10 seconds', now())",
        name,
    )
    st = await wait_status(
        env, "rb", "progress in status", lambda s: (s.get("rebuild") or {}).get("done") == 150
    )
    progress = st["rebuild"]
    assert progress["job"] == name and progress["models"] == ["records"]
    assert (progress["version"], progress["phase"], progress["total"]) == (2, "catch-up", 300)
    assert progress["percent"] == 50.0 and progress["outcome"] == "Running"
    assert 14.0 <= progress["commandsPerSecond"] <= 15.0 and 10.0 <= progress["etaSeconds"] <= 11
    assert progress["startedAt"].endswith("Z")
    assert (rebuilding(st)["status"], rebuilding(st)["reason"]) == ("True", "CatchUp")
    assert ready(st) == "True" and st["phase"] == "Ready"  # serving throughout

    assert await run_jobs(env.api, env.namespace, "rb", "rebuild") == 1
    st = await wait_status(
        env, "rb", "Rebuilding False Swapped", lambda s: rebuilding(s).get("reason") == "Swapped"
    )
    assert rebuilding(st)["status"] == "False"
    assert live(st) == {"records": 2, "history": 1}
    assert st["readModels"][0]["lastRun"] == {
        "job": name,
        "version": 2,
        "request": "",
        "outcome": "Swapped",
    }
    done = st["rebuild"]
    assert (done["phase"], done["done"], done["total"], done["percent"]) == (
        "done",
        COMMANDS,
        COMMANDS,
        100.0,
    )
    assert done["finishedAt"] and ready(st) == "True"
    swapped = await wait_event(env.api, env.namespace, "rb", "RebuildSwapped", env.operator)
    assert "version 2 of records is live" in swapped.message
    rows = await read_db(env, "SELECT count(*) FROM records")
    assert rows[0][0] == COMMANDS  # rebuilt from the write DB
    await asyncio.sleep(SETTLE)  # absence: no second Job for a version that is live
    assert len(await rebuild_jobs(env, "rb")) == 1


async def test_the_rebuild_annotation_rebuilds_every_model_once_per_value(env: Env) -> None:
    await ready_stack(env, "ann", readModels=TWO_MODELS)
    await seed(env, 50)
    await annotate(env, "ann", "now")
    for count, model in ((1, "records"), (2, "history")):
        job = await wait_job(env, "ann", count)
        args = job.spec.template.spec.containers[0].args
        assert args[:5] == ["rebuild", "--model", model, "--version", "1"], args
        assert len(unfinished(await rebuild_jobs(env, "ann"))) == 1
        assert await run_jobs(env.api, env.namespace, "ann", "rebuild") == 1
    st = await wait_status(
        env, "ann", "the value handled", lambda s: s.get("rebuildRequest") == "now"
    )
    assert live(st) == {"records": 1, "history": 1}  # rebuilt at their version
    assert {m["lastRun"]["outcome"] for m in st["readModels"]} == {"Swapped"}
    assert (await read_db(env, "SELECT count(*) FROM history"))[0][0] == 50

    await annotate(env, "ann", "now")  # the same value: nothing
    await asyncio.sleep(SETTLE)
    assert len(await rebuild_jobs(env, "ann")) == 2
    await annotate(env, "ann", "again")  # a new value: once more
    job = await wait_job(env, "ann", 3)
    assert job.spec.template.spec.containers[0].args[2] == "records"


async def test_a_failed_rebuild_leaves_the_live_model_and_is_not_retried(env: Env) -> None:
    await ready_stack(env, "bad")
    await read_db(
        env,
        "INSERT INTO records (key, value, created_at, updated_at, read_count, write_count,"
        " first_command_id, last_command_id) VALUES ('live', 'kept', now(), now(), 7, 1, 1, 1)",
    )
    await bump(env, "bad", [{"name": "records", "version": 2}])
    first = await wait_job(env, "bad", 1)
    assert await fail_jobs(env.api, env.namespace, "bad", "rebuild", "rebuild failed: boom") == 1
    st = await wait_status(
        env, "bad", "Rebuilding False Failed", lambda s: rebuilding(s).get("reason") == "Failed"
    )
    assert rebuilding(st)["status"] == "False" and "boom" in rebuilding(st)["message"]
    assert live(st) == {"records": 1} and st["readModels"][0]["lastRun"]["outcome"] == "Failed"
    assert ready(st) == "True"
    failed = await wait_event(env.api, env.namespace, "bad", "RebuildFailed", env.operator)
    assert failed.type == "Warning" and "boom" in failed.message
    assert "untouched" in failed.message and "password" not in failed.message.lower()
    rows = await read_db(env, "SELECT key, value, read_count FROM records")
    assert [tuple(r) for r in rows] == [("live", "kept", 7)]
    assert await read_db(env, "SELECT * FROM read_model_versions") == []

    await asyncio.sleep(SETTLE)  # no retry loop: the same version waits for a change
    assert [j.metadata.name for j in await rebuild_jobs(env, "bad")] == [first.metadata.name]
    assert (
        len([e for e in await events(env.api, env.namespace, "bad") if e.reason == "RebuildFailed"])
        == 1
    )

    await annotate(env, "bad", "retry")  # a new value runs it again, as a new run
    second = await wait_job(env, "bad", 2)
    assert second.metadata.name != first.metadata.name
    assert second.spec.template.spec.containers[0].args[4] == "2"
    assert await run_jobs(env.api, env.namespace, "bad", "rebuild") == 1
    st = await wait_status(
        env, "bad", "Rebuilding False Swapped", lambda s: rebuilding(s).get("reason") == "Swapped"
    )
    assert live(st) == {"records": 2}


async def test_two_bumps_in_a_row_run_one_job_at_a_time_and_a_deleted_job_cancels(
    env: Env,
) -> None:
    await ready_stack(env, "two")
    most = 0

    async def watch() -> None:
        nonlocal most
        for _ in range(600):  # bounded: 60 s at most
            most = max(most, len(unfinished(await rebuild_jobs(env, "two"))))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    try:
        await bump(env, "two", [{"name": "records", "version": 2}])
        first = await wait_job(env, "two", 1)
        await bump(env, "two", [{"name": "records", "version": 3}])
        cancelled = await wait_event(
            env.api, env.namespace, "two", "RebuildCancelled", env.operator
        )
        assert first.metadata.name in cancelled.message
        second = await wait_job(env, "two", 1)  # the first is gone (deleted), one remains
        assert second.metadata.name != first.metadata.name
        assert second.spec.template.spec.containers[0].args[4] == "3"

        # A person deleting the running Job cancels it too: nothing runs, nothing is retried.
        await client.BatchV1Api(env.api).delete_namespaced_job(
            second.metadata.name, env.namespace, propagation_policy="Background"
        )
        st = await wait_status(
            env,
            "two",
            "Rebuilding False Cancelled",
            lambda s: (
                rebuilding(s).get("reason") == "Cancelled"
                and (s.get("rebuild") or {}).get("job") == second.metadata.name
            ),
        )
        assert live(st) == {"records": 1} and ready(st) == "True"
        assert st["readModels"][0]["lastRun"]["outcome"] == "Cancelled"
        await asyncio.sleep(SETTLE)
        assert await rebuild_jobs(env, "two") == []

        await annotate(env, "two", "go")  # retried on request
        third = await wait_job(env, "two", 1)
        assert third.spec.template.spec.containers[0].args[4] == "3"
        assert await run_jobs(env.api, env.namespace, "two", "rebuild") == 1
        await wait_status(env, "two", "version 3 live", lambda s: live(s) == {"records": 3})
    finally:
        watcher.cancel()
    assert most == 1

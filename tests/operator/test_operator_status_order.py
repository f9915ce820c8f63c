"""A reconcile's status never lands after a newer reconcile's, nor an older spec's after a
newer one's. The reconciles run in this test process (as the operator runs them, against
the real kube-apiserver, PostgreSQL and Redis) in an order the test chooses.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from kopf._core.engines import posting
from kubernetes_asyncio import client
from redis.asyncio import Redis

from cqrs_operator import handlers
from cqrs_operator.spec import GROUP, PLURAL, VERSION
from tests.operator.fixtures_operator import Env


async def _status(env: Env, name: str) -> dict[str, Any]:
    obj = await env.stacks.get(name)
    assert obj is not None
    status: dict[str, Any] = obj.get("status") or {}
    return status


async def test_an_older_reconciles_status_never_lands_after_a_newer_ones(
    env: Env, kube_api: client.ApiClient
) -> None:
    """Reconcile A reads a lag of 3, B (after more writes) a lag of 7; A's kopf patch is
    applied last, as kopf applies a handler's patch after it returned (outside the lock).
    The status keeps B's reading: each reconcile writes its status under the stack's lock."""
    await env.stacks.create(env.manifest("lagging"))
    await env.stacks.wait_ready("lagging", env.operator)
    env.operator.stop()  # this test process reconciles from now on, as the operator does
    posting.event_queue_var.set(asyncio.Queue())  # kopf's Events, posted nowhere here
    memo = kopf.Memo(api=kube_api)
    redis = Redis.from_url(env.redis.url)
    stream = f"{env.namespace}.lagging-events"

    async def reconcile(generation_offset: int = 0) -> kopf.Patch:
        obj = await env.stacks.get("lagging")
        assert obj is not None
        meta = {**obj["metadata"]}
        meta["generation"] = meta["generation"] + generation_offset
        body = kopf.Body({**obj, "metadata": meta})
        patch = kopf.Patch()
        await handlers._reconcile(body, body.spec, body.meta, body.status, patch, memo)
        return patch

    async def kopf_applies(patch: kopf.Patch) -> None:
        if patch.get("status"):
            await client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                env.namespace,
                PLURAL,
                "lagging",
                {"status": patch["status"]},
                _content_type="application/merge-patch+json",  # as kopf patches
            )

    try:
        for i in range(3):  # no projector pod runs here: the entries stay undelivered
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})
        older = await reconcile()
        for i in range(3, 7):
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})
        newer = await reconcile()
        await kopf_applies(newer)
        await kopf_applies(older)
        status = await _status(env, "lagging")
        assert status["projector"]["lag"] == 7, status["projector"]

        # A reconcile of an older generation than the one written changes nothing.
        generation = status["observedGeneration"]
        await kopf_applies(await reconcile(generation_offset=-1))
        assert (await _status(env, "lagging"))["observedGeneration"] == generation
    finally:
        await redis.aclose()


@pytest.fixture(autouse=True)
def _no_stale_locks() -> None:
    handlers._LOCKS.clear()  # in-process reconciles: one test's locks never reach another


async def test_a_reconcile_that_waited_for_the_lock_does_nothing_to_a_stack_being_deleted(
    env: Env, kube_api: client.ApiClient
) -> None:
    """A timer's reconcile queued behind the teardown (its body from before the deletion)
    finds the stack being deleted: it provisions nothing again and writes no status."""
    await env.stacks.create(env.manifest("leaving", deletionPolicy="Delete"))
    await env.stacks.wait_ready("leaving", env.operator)
    env.operator.stop()  # nobody runs the teardown: the finalizer keeps the stack
    posting.event_queue_var.set(asyncio.Queue())
    memo = kopf.Memo(api=kube_api)
    before = await env.stacks.get("leaving")
    assert before is not None and not before["metadata"].get("deletionTimestamp")
    await env.stacks.delete("leaving")
    deleting = await env.stacks.get("leaving")
    assert deleting is not None and deleting["metadata"].get("deletionTimestamp")

    body = kopf.Body(before)  # what a call begun before the deletion carries
    outcome = await handlers._reconcile(body, body.spec, body.meta, body.status, kopf.Patch(), memo)
    assert outcome is not None and not outcome.conditions and not outcome.extra
    after = await env.stacks.get("leaving")
    assert after is not None
    assert after.get("status") == deleting.get("status")

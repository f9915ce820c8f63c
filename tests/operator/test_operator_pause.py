"""Pause: ``cqrs.dev/reconcile: paused`` stops every change to a stack until it is removed.

While paused the operator applies nothing (the Deployments and the ConfigMap keep their
resourceVersion through several reconcile intervals after a spec change), the stack's
observedGeneration stays behind its generation and ``ReconciliationPaused`` is True; once the
annotation is removed, what changed meanwhile is applied. A paused stack that is deleted keeps
its databases whatever its deletionPolicy.
"""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

from cqrs_operator.handlers import IGNORED_PAUSE_REASON, PAUSE_ANNOTATION, PAUSED
from tests.operator.fixtures_operator import (
    COMPONENTS,
    Env,
    database_exists,
    names,
    role_exists,
    wait_event,
    wait_until,
)

# Reconcile intervals watched while paused (the fixture operator's interval is 2 s).
INTERVALS = 3


async def versions(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    """The resourceVersion of each Deployment and of the ConfigMap of stack ``name``."""
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    out = {}
    for component in COMPONENTS:
        dep = await apps.read_namespaced_deployment(f"{name}-{component}", namespace)
        out[component] = dep.metadata.resource_version
    config = await core.read_namespaced_config_map(f"{name}-config", namespace)
    out["config"] = config.metadata.resource_version
    return out


def timer_runs(log: str) -> int:
    """How many times the re-verify timer finished (kopf logs each; one stack per test)."""
    return log.count("Timer 'reverify_stack' succeeded")


async def pause(env: Env, name: str, on: bool) -> None:
    await env.stacks.patch(
        name, {"metadata": {"annotations": {PAUSE_ANNOTATION: PAUSED if on else None}}}
    )


async def test_a_paused_stack_is_left_alone_and_catches_up_when_resumed(env: Env) -> None:
    await env.stacks.create(env.manifest("calm"))
    await env.stacks.wait_ready("calm", env.operator)
    await pause(env, "calm", True)
    paused = await env.stacks.wait_condition(
        "calm", "ReconciliationPaused", "True", "ReconciliationPaused", env.operator, timeout=15
    )
    said = {c["type"]: c for c in paused["status"]["conditions"]}["ReconciliationPaused"]
    assert "no change is made" in said["message"]
    before = await versions(env.api, env.namespace, "calm")
    runs = timer_runs(env.operator.log_text())

    changed = await env.stacks.patch(
        "calm", {"spec": {"readApi": {"replicas": 3}, "projector": {"batchSize": 250}}}
    )

    async def intervals_passed() -> bool:
        return timer_runs(env.operator.log_text()) >= runs + INTERVALS

    await wait_until(
        intervals_passed,
        timeout=INTERVALS * 2 + 20,
        what=f"{INTERVALS} reconcile intervals while paused",
        alive=env.operator.exit_reason,
    )
    assert await versions(env.api, env.namespace, "calm") == before
    obj = await env.stacks.get("calm")
    assert obj is not None
    assert obj["status"]["observedGeneration"] < changed["metadata"]["generation"]
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions["ReconciliationPaused"]["status"] == "True"
    assert conditions["Ready"]["status"] == "True"  # as the last reconcile left it

    await pause(env, "calm", False)
    await env.stacks.wait_condition(
        "calm", "ReconciliationPaused", "False", "ReconciliationResumed", env.operator, timeout=15
    )
    resumed = await env.stacks.wait_ready("calm", env.operator)
    assert resumed["status"]["observedGeneration"] == changed["metadata"]["generation"]
    dep = await client.AppsV1Api(env.api).read_namespaced_deployment("calm-read-api", env.namespace)
    assert dep.spec.replicas == 3


async def test_a_paused_stack_deleted_keeps_its_databases(env: Env) -> None:
    """Hands off means hands off: deletionPolicy Delete is not carried out while paused."""
    await env.stacks.create(env.manifest("kept", deletionPolicy="Delete"))
    await env.stacks.wait_ready("kept", env.operator)
    await pause(env, "kept", True)
    await env.stacks.wait_condition(
        "kept", "ReconciliationPaused", "True", operator=env.operator, timeout=15
    )
    await env.stacks.delete("kept")
    await env.stacks.wait_gone("kept", env.operator)
    event: Any = await wait_event(env.api, env.namespace, "kept", "Retained", env.operator)
    assert f"{PAUSE_ANNOTATION}: {PAUSED}" in event.message
    assert await database_exists(env.write_pg, f"w_{env.fresh}")
    assert await database_exists(env.read_pg, f"r_{env.fresh}")
    assert await role_exists(env.write_pg, names(env.namespace, "kept").role)


async def test_resuming_a_stack_whose_spec_became_invalid_clears_the_pause(env: Env) -> None:
    """The invalid-spec path reports the resume too: ReconciliationPaused is False."""
    manifest = env.manifest("bent")
    manifest["metadata"].setdefault("annotations", {})[PAUSE_ANNOTATION] = PAUSED
    await env.stacks.create(manifest)
    await env.stacks.wait_condition(
        "bent", "ReconciliationPaused", "True", operator=env.operator, timeout=15
    )
    # The CRD accepts it, the operator's parser refuses it.
    await env.stacks.patch("bent", {"spec": {"redis": {"url": env.redis.url + "#fragment"}}})
    await pause(env, "bent", False)
    await env.stacks.wait_condition(
        "bent", "WorkloadsReady", "False", "InvalidSpec", env.operator, timeout=15
    )
    await env.stacks.wait_condition(
        "bent", "ReconciliationPaused", "False", "ReconciliationResumed", env.operator, timeout=15
    )


async def test_a_pause_value_other_than_paused_is_reported_not_ignored(env: Env) -> None:
    """``Paused`` or ``true`` do not pause (only ``paused`` does); each is named in a Warning
    Event and in the ReconciliationPaused condition, and the stack is reconciled."""
    await env.stacks.create(env.manifest("odd"))
    await env.stacks.wait_ready("odd", env.operator)
    for value in ("Paused", "true"):
        await env.stacks.patch("odd", {"metadata": {"annotations": {PAUSE_ANNOTATION: value}}})

        async def said(value: str = value) -> Any:
            obj = await env.stacks.get("odd")
            conditions = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}
            cond = conditions.get("ReconciliationPaused", {})
            return cond if repr(value) in cond.get("message", "") else None

        cond = await wait_until(
            said, timeout=15, what=f"{value!r} named", alive=env.operator.exit_reason
        )
        assert (cond["status"], cond["reason"]) == ("False", IGNORED_PAUSE_REASON)
        event: Any = await wait_event(
            env.api, env.namespace, "odd", IGNORED_PAUSE_REASON, env.operator
        )
        assert "only 'paused' pauses" in event.message
    # Not paused: a change is applied.
    await env.stacks.patch("odd", {"spec": {"readApi": {"replicas": 3}}})

    async def applied() -> bool:
        dep = await client.AppsV1Api(env.api).read_namespaced_deployment(
            "odd-read-api", env.namespace
        )
        return bool(dep.spec.replicas == 3)

    await wait_until(applied, timeout=20, what="the change applied", alive=env.operator.exit_reason)

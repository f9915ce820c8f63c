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

from cqrs_operator.handlers import PAUSE_ANNOTATION, PAUSED
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

"""ProjectionStalled / ProjectionDegraded against the real API server, with the operator running
and a real stream (no projector pod runs here: entries added stay undelivered)."""

from __future__ import annotations

from redis.asyncio import Redis

from tests.operator.fixtures_operator import Env


def _conditions(obj: dict[str, object]) -> dict[str, dict[str, str]]:
    found = (obj.get("status") or {}).get("conditions") or []  # type: ignore[union-attr]
    return {c["type"]: c for c in found}


async def test_projection_stalled_while_nobody_reads_then_false_once_consumed(env: Env) -> None:
    await env.stacks.create(env.manifest("stall"))
    await env.stacks.wait_ready("stall", env.operator)
    await env.stacks.wait_condition(
        "stall", "ProjectionStalled", "False", "Progressing", env.operator
    )
    redis = Redis.from_url(env.redis.url)
    stream = f"{env.namespace}.stall-events"
    try:
        for i in range(5):
            await redis.xadd(stream, {"type": "RecordCreated", "position": str(i + 1)})
        obj = await env.stacks.wait_condition(
            "stall", "ProjectionStalled", "True", "NoConsumerReading", env.operator
        )
        conds = _conditions(obj)
        assert conds["ProjectionStalled"]["message"].startswith(
            "no consumer reads the stream: 5 entries not acknowledged (5 undelivered)"
        )
        assert conds["ProjectionDegraded"]["status"] == "False"
        assert conds["Ready"]["status"] == "True"  # serving: the backlog is reported beside it
        projector = obj["status"]["projector"]
        assert projector["health"]["verdict"] == "stalled"
        assert projector["health"]["lagEvents"] == 5
        assert projector["health"]["lagSeconds"] >= 0
        assert projector["progress"]["marker"]
        assert projector["lag"] == 5

        await redis.xgroup_setid(stream, "projectors", "$")  # the backlog is consumed
        obj = await env.stacks.wait_condition(
            "stall", "ProjectionStalled", "False", "Progressing", env.operator
        )
        assert obj["status"]["projector"]["health"]["verdict"] == "ok"
        assert _conditions(obj)["ProjectionDegraded"]["reason"] == "KeepsUp"
    finally:
        await redis.aclose()

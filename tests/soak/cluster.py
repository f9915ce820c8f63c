"""The soak's stack: two PostgreSQL servers, Redis, and the services as real processes.

Servers come from ``cqrs_stack.localservers``; processes are launched the way the test
fixtures launch them (``tests.fixtures.stack.Stack.launch``), so the soak runs exactly what
the integration tests run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from cqrs_stack.config import Settings
from cqrs_stack.db import create_engine
from cqrs_stack.localservers import PostgresServer, RedisServer, free_port
from cqrs_stack.migrations import migrate
from tests.fixtures.stack import FAST_SETTINGS, ServiceProcess, Stack

WRITE_DB, READ_DB = "soak_write", "soak_read"

# The fixtures' fast settings, plus a small delivery budget so the poison event is
# dead-lettered within seconds.
SOAK_SETTINGS = {**FAST_SETTINGS, "PROJECTOR_MAX_DELIVERIES": "3", "STREAM_MAX_LENGTH": "0"}


@dataclass
class Cluster:
    """Servers, the stack's processes and the root folder that holds their data and logs."""

    root: Path
    write_pg: PostgresServer
    read_pg: PostgresServer
    redis_server: RedisServer
    stack: Stack
    write_api: ServiceProcess | None = None
    read_api: ServiceProcess | None = None
    projectors: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        """The settings the stack's processes run with."""
        return self.stack.settings

    async def launch_projector(self, name: str) -> ServiceProcess:
        """Start a projector replica with consumer name ``name`` and wait until it is ready."""
        process = await self.stack.launch("projector", CONSUMER_NAME=name)
        self.projectors[name] = process
        return process


async def start_cluster(projectors: int = 2) -> Cluster:
    """Start everything; the caller must ``stop_cluster`` it (also on failure)."""
    root = Path(tempfile.mkdtemp(prefix="cqrs-soak-"))
    root.chmod(0o755)  # noqa: ASYNC240 - PostgreSQL may run as nobody and must traverse it
    write_pg = PostgresServer(root / "pg-write", free_port(), password="soak-w", durable=False)
    read_pg = PostgresServer(root / "pg-read", free_port(), password="soak-r", durable=False)
    redis_server = RedisServer(root / "redis", free_port(), durable=False)
    for server in (write_pg, read_pg, redis_server):
        await asyncio.to_thread(server.start)
    await asyncio.to_thread(write_pg.create_database, WRITE_DB)
    await asyncio.to_thread(read_pg.create_database, READ_DB)
    env = {
        "WRITE_DB_URL": write_pg.url(WRITE_DB),
        "READ_DB_URL": read_pg.url(READ_DB),
        "REDIS_URL": redis_server.url,
        "EVENT_STREAM_NAME": "soak-events",
        **SOAK_SETTINGS,
    }
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    write_engine = create_engine(settings.write_db_url, settings, application_name="soak")
    read_engine = create_engine(settings.read_db_url, settings, application_name="soak")
    await migrate(write_engine, "write")
    await migrate(read_engine, "read")
    (root / "logs").mkdir()
    stack = Stack(env, write_engine, read_engine, Redis.from_url(redis_server.url), root / "logs")
    cluster = Cluster(root, write_pg, read_pg, redis_server, stack)
    cluster.write_api = await stack.launch("write-api")
    cluster.read_api = await stack.launch("read-api")
    for number in range(1, projectors + 1):
        await cluster.launch_projector(f"projector-{number}")
    return cluster


async def stop_cluster(cluster: Cluster, keep: bool = False) -> None:
    """Kill the processes, stop the servers and (unless ``keep``) remove the data."""
    for process in cluster.stack.processes:
        process.kill()
    await cluster.stack.redis.aclose()
    await cluster.stack.write_engine.dispose()
    await cluster.stack.read_engine.dispose()
    for server in (cluster.write_pg, cluster.read_pg, cluster.redis_server):
        await asyncio.to_thread(server.stop)
    if not keep:
        shutil.rmtree(cluster.root, ignore_errors=True)

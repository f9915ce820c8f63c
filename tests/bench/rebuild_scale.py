"""Benchmark phase: a blue/green rebuild at scale, and what reads and writes see during it.

On databases of its own (beside the bench's, on the same servers) and an API and projector
of their own, for each size: the write DB is seeded with SQL (ten commands per key), the
read model built by a first ``cqrs-stack rebuild`` (timed: the rebuild alone), then reads
(spread over the seeded keys) and writes run for a while without a rebuild (the baseline),
then the same load runs while a second rebuild goes on, in one-second windows until it ends.
Figures: each rebuild's time, commands/s and peak RSS (its own process, measured from a small
parent), read p50/p99 and write rate with and without the rebuild, and errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from cqrs_stack.config import plain_database_url
from cqrs_stack.localservers import free_port

from .load import LoadResult, closed_loop, percentile
from .stack import Service

if TYPE_CHECKING:
    from .phases import Bench

# Sizes in commands: the figures in the full run; one small size in the quick one.
FULL_SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (100_000,)
READ_CLIENTS = 16
WRITE_CLIENTS = 4
BASELINE_SECONDS = {"full": 10.0, "quick": 2.0}
WINDOW_SECONDS = 1.0
# A rebuild never runs longer than this here (10M commands at 20,000/s on a loaded machine).
REBUILD_TIMEOUT = 1800.0
# Runs a command and prints its peak RSS in KiB: the child's own VmHWM, not this process's.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]);"
    " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)
_SEED = """
    INSERT INTO commands (key, value, event_type, published)
    SELECT 'big:' || lpad((g % $2)::text, 8, '0'), repeat('v', 64),
           CASE WHEN g < $2 THEN 'RecordCreated' ELSE 'RecordUpdated' END, true
    FROM generate_series($1::bigint, $3::bigint - 1) AS g
"""


class RebuildScale:
    """The phase's own databases and processes, on the bench's servers."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        stack = bench.stack
        stack.write_pg.create_database("bench_rebuild_w")
        stack.read_pg.create_database("bench_rebuild_r")
        self.env = {
            **stack.env,
            "WRITE_DB_URL": stack.write_pg.url("bench_rebuild_w"),
            "READ_DB_URL": stack.read_pg.url("bench_rebuild_r"),
            "EVENT_STREAM_NAME": "bench-rebuild-events",
        }
        self.services: list[Service] = []
        self.seeded = 0

    def run(self, *args: str, timeout: float = REBUILD_TIMEOUT) -> tuple[float, float]:
        """``cqrs-stack ARGS`` to its end: (wall seconds, peak RSS in MB of that process)."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "cqrs_stack.cli", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return time.perf_counter() - started, int(done.stdout.split()[-1]) / 1024

    def launch(self, role: str) -> Service:
        """``cqrs-stack ROLE`` on the phase's databases."""
        port = free_port()
        log_path = self.bench.stack.root / f"rebuild-scale-{role}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cqrs_stack.cli", role, "--port", str(port)],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        service = Service(role, port, process, log_path)
        self.services.append(service)
        service.wait_ready()
        return service

    async def seed(self, commands: int) -> float:
        """Bring the write DB to ``commands`` commands, a tenth as many keys; its seconds."""
        keys = max(1, commands // 10)
        started = time.perf_counter()
        conn = await asyncpg.connect(plain_database_url(self.env["WRITE_DB_URL"]))
        try:
            async with conn.transaction():  # one transaction, one txid, like a bulk load
                await conn.execute(_SEED, self.seeded, keys, commands, timeout=3600)
                txid, last = await conn.fetchrow(
                    "SELECT pg_current_xact_id()::text, max(id) FROM commands"
                )
            await conn.execute("ANALYZE commands")
        finally:
            await conn.close()
        # The rebuild, not the projectors' sweep, builds the model of the seed: the sweep's
        # cursor goes past it, as after a sweep (the large-data phase does the same).
        conn = await asyncpg.connect(plain_database_url(self.env["READ_DB_URL"]))
        try:
            await conn.execute(
                "UPDATE projector_catchup SET cursor_txid = $1::text::xid8, cursor_id = $2"
                " WHERE (cursor_txid, cursor_id) < ($1::text::xid8, $2)",
                txid,
                last,
            )
        finally:
            await conn.close()
        self.seeded = commands
        return time.perf_counter() - started

    async def load(self, api: Service, keys: int, until: asyncio.Event | None) -> dict[str, Any]:
        """Reads and writes at once: for the baseline's seconds, or in windows until set."""
        reads, writes = LoadResult(), LoadResult()
        rng = self.bench.rng

        def read(client: int, i: int) -> tuple[str, str, bytes]:
            return "GET", f"/read/big:{rng.randrange(keys):08d}", b""

        def write(client: int, i: int) -> tuple[str, str, bytes]:
            body = {"key": f"big:{rng.randrange(keys):08d}", "value": "w"}
            return "PUT", "/write", json.dumps(body).encode()

        seconds = BASELINE_SECONDS[self.bench.plan.name] if until is None else WINDOW_SECONDS
        for _ in range(int(REBUILD_TIMEOUT / WINDOW_SECONDS)):
            r, w = await asyncio.gather(
                closed_loop(api.port, READ_CLIENTS, seconds, read),
                closed_loop(api.port, WRITE_CLIENTS, seconds, write),
            )
            for total, part in ((reads, r), (writes, w)):
                total.requests += part.requests
                total.errors += part.errors
                total.seconds += part.seconds
                total.latencies += part.latencies
            if until is None or until.is_set():
                break
        return {
            "read_rate": round(reads.rate, 1),
            "read_p50_ms": round(percentile(reads.latencies, 50) * 1000, 2),
            "read_p99_ms": round(percentile(reads.latencies, 99) * 1000, 2),
            "read_max_ms": round(max(reads.latencies, default=0.0) * 1000, 2),
            "write_rate": round(writes.rate, 1),
            "write_p99_ms": round(percentile(writes.latencies, 99) * 1000, 2),
            "errors": reads.errors + writes.errors,
            "seconds": round(reads.seconds, 1),
        }

    async def measure(self, commands: int, api: Service) -> dict[str, Any]:
        """One size: seed, a rebuild alone, the load alone, the load during a rebuild."""
        seed_seconds = await self.seed(commands)
        before = await self._commands()
        alone, alone_rss = await asyncio.to_thread(self.run, "rebuild")
        keys = max(1, commands // 10)
        baseline = await self.load(api, keys, None)
        done = asyncio.Event()

        async def rebuild_during() -> tuple[float, float]:
            try:
                return await asyncio.to_thread(self.run, "rebuild")
            finally:
                done.set()

        rebuilding = asyncio.create_task(rebuild_during())
        during = await self.load(api, keys, done)
        under_load, under_load_rss = await rebuilding
        total = await self._commands()
        figures = {
            "commands": total,
            "seed_seconds": round(seed_seconds, 1),
            "rebuild_alone_seconds": round(alone, 2),
            "rebuild_alone_rate": round(before / alone, 1),
            "rebuild_alone_peak_rss_mb": round(alone_rss, 1),
            "rebuild_under_load_seconds": round(under_load, 2),
            "rebuild_under_load_rate": round(total / under_load, 1),
            "rebuild_under_load_peak_rss_mb": round(under_load_rss, 1),
            "without_rebuild": baseline,
            "during_rebuild": during,
            "read_p99_ratio": round(during["read_p99_ms"] / max(baseline["read_p99_ms"], 1e-3), 2),
            "write_rate_ratio": round(during["write_rate"] / max(baseline["write_rate"], 1e-3), 2),
        }
        print(f"bench: rebuild at {commands}: {json.dumps(figures)}", file=sys.stderr)
        return figures

    async def _commands(self) -> int:
        conn = await asyncpg.connect(plain_database_url(self.env["WRITE_DB_URL"]))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM commands"))
        finally:
            await conn.close()

    def stop(self) -> None:
        """Stop the phase's processes."""
        for service in self.services:
            service.stop()


async def rebuild_scale_phase(bench: Bench, sizes: tuple[int, ...] | None = None) -> None:
    """The phase, at each of ``sizes`` (default: the plan's), into results["rebuild_scale"]."""
    if sizes is None:
        sizes = FULL_SIZES if bench.plan.name == "full" else QUICK_SIZES
    scale = RebuildScale(bench)
    try:
        await asyncio.to_thread(scale.run, "migrate")
        api = await asyncio.to_thread(scale.launch, "api")
        await asyncio.to_thread(scale.launch, "projector")
        figures = {}
        for size in sizes:
            figures[str(size)] = await scale.measure(size, api)
        bench.results["rebuild_scale"] = figures
    finally:
        scale.stop()

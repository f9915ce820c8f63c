"""Benchmark phase: a blue/green rebuild at scale, and what reads and writes see during it.

On databases of its own (beside the bench's, on the same servers) and an API and projector
of their own, for each size: the write DB is seeded with SQL (ten commands per key), the
read model built by a first ``cqrs-stack rebuild`` (timed: the rebuild alone), then reads
(spread over the seeded keys) and writes run for a while without a rebuild (the baseline),
then the same load runs while a second rebuild goes on, in one-second windows until it ends.
Figures: each rebuild's time, commands/s, peak RSS and CPU seconds (its own process, measured
from a small parent), the wall seconds of its steps (what the rebuild logs at its end: copy,
ledger, project, indexes, analyze, read counts, catch-up, verify, swap), the CPU seconds of
each server and process meanwhile and the load average, read p50/p99 and write rate with and
without the rebuild, errors, and what the read DB's sessions waited on during each rebuild
(``pg_stat_activity`` sampled every ``WAIT_SAMPLE_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import psutil

from cqrs_stack.config import plain_database_url
from cqrs_stack.localservers import free_port

from .load import LoadResult, closed_loop, percentile
from .stack import Service

if TYPE_CHECKING:
    from .phases import Bench

# Sizes in commands: the figures in the full run; one small size in the quick one.
FULL_SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (20_000,)
READ_CLIENTS = 16
WRITE_CLIENTS = 4
BASELINE_SECONDS = {"full": 10.0, "quick": 2.0}
WINDOW_SECONDS = 1.0
# A rebuild never runs longer than this here (10M commands at 20,000/s on a loaded machine).
REBUILD_TIMEOUT = 1800.0
# Runs a command and prints its peak RSS in KiB (the child's own VmHWM, not this process's)
# and its CPU seconds (user + system), on stdout's last line.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]);"
    " u = resource.getrusage(resource.RUSAGE_CHILDREN);"
    " print(u.ru_maxrss, u.ru_utime + u.ru_stime); sys.exit(code)"
)
# What the rebuild logs at its end (rebuild._log_steps): its steps' wall seconds, as JSON.
STEPS_MARK = "rebuild steps "
# pg_stat_activity of the read DB, sampled this often while a rebuild runs.
WAIT_SAMPLE_SECONDS = 0.05
# A read DB query running at least this long in a sample is kept (what it waited on).
SLOW_QUERY_MS = 50.0
_ACTIVITY = """
    SELECT pid, application_name, state,
           coalesce(wait_event_type || ':' || wait_event, 'CPU'),
           extract(epoch FROM clock_timestamp() - query_start) * 1000, left(query, 60)
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
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
        self.runs = 0

    def run(self, *args: str, timeout: float = REBUILD_TIMEOUT) -> dict[str, Any]:
        """``cqrs-stack ARGS`` to its end: its wall seconds, peak RSS (MB) and CPU seconds,
        and the steps it logged (``STEPS_MARK``; empty for a command that logs none)."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "cqrs_stack.cli", *args],
            env={**os.environ, **self.env, "LOG_LEVEL": "info"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - started
        # Kept beside results.json (the run's folder is removed at its end).
        self.runs += 1
        log_path = self.bench.stack.root.parent / f"rebuild-scale-{self.runs}-{args[0]}.log"
        log_path.write_text(done.stderr)
        if done.returncode != 0:
            raise RuntimeError(
                f"cqrs-stack {' '.join(args)} failed ({done.returncode}), log {log_path}:"
                f" {done.stderr[-1500:]}"
            )
        rss_kib, cpu = done.stdout.split()[-2:]
        steps: dict[str, float] = {}
        for line in done.stderr.splitlines():
            if STEPS_MARK in line and "steps=" in line:
                steps = json.loads(line.rpartition("steps=")[2])
        return {"seconds": wall, "rss_mb": int(rss_kib) / 1024, "cpu_s": float(cpu), "steps": steps}

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
        # Each window's read p99, with its start since the load's: which step of the rebuild
        # (its log's times) moves the tail.
        windows: list[tuple[float, float]] = []
        began = time.time()
        for _ in range(int(REBUILD_TIMEOUT / WINDOW_SECONDS)):
            opened = time.time()
            r, w = await asyncio.gather(
                closed_loop(api.port, READ_CLIENTS, seconds, read),
                closed_loop(api.port, WRITE_CLIENTS, seconds, write),
            )
            for total, part in ((reads, r), (writes, w)):
                total.requests += part.requests
                total.errors += part.errors
                total.seconds += part.seconds
                total.latencies += part.latencies
            windows.append((round(opened - began, 1), round(percentile(r.latencies, 99) * 1000, 1)))
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
            "began_at": round(began, 3),
            "window_read_p99_ms": windows if until is not None else [],
        }

    async def measure(self, commands: int, api: Service) -> dict[str, Any]:
        """One size: seed, a rebuild alone, the load alone, the load during a rebuild."""
        seed_seconds = await self.seed(commands)
        before = await self._commands()
        cpu = CpuMeter(self._pids())
        async with self._observed(cpu) as alone_seen:
            alone = await asyncio.to_thread(self.run, "rebuild")
        keys = max(1, commands // 10)
        cpu.mark()
        baseline = await self.load(api, keys, None)
        baseline["cpu_s"] = cpu.mark()
        done = asyncio.Event()

        async def rebuild_during() -> dict[str, Any]:
            try:
                return await asyncio.to_thread(self.run, "rebuild")
            finally:
                done.set()

        async with self._observed(cpu) as during_seen:
            rebuilding = asyncio.create_task(rebuild_during())
            during = await self.load(api, keys, done)
            under_load = await rebuilding
        total = await self._commands()
        figures = {
            "commands": total,
            "seed_seconds": round(seed_seconds, 1),
            "rebuild_alone_seconds": round(alone["seconds"], 2),
            "rebuild_alone_rate": round(before / alone["seconds"], 1),
            "rebuild_alone_peak_rss_mb": round(alone["rss_mb"], 1),
            "rebuild_alone_steps": alone["steps"],
            "rebuild_alone_seen": {
                **alone_seen,
                "cpu_s": {**alone_seen["cpu_s"], "rebuild": round(alone["cpu_s"], 2)},
            },
            "rebuild_under_load_seconds": round(under_load["seconds"], 2),
            "rebuild_under_load_rate": round(total / under_load["seconds"], 1),
            "rebuild_under_load_peak_rss_mb": round(under_load["rss_mb"], 1),
            "rebuild_under_load_steps": under_load["steps"],
            "rebuild_under_load_seen": {
                **during_seen,
                "cpu_s": {**during_seen["cpu_s"], "rebuild": round(under_load["cpu_s"], 2)},
            },
            "without_rebuild": baseline,
            "during_rebuild": during,
            "read_p99_ratio": round(during["read_p99_ms"] / max(baseline["read_p99_ms"], 1e-3), 2),
            "write_rate_ratio": round(during["write_rate"] / max(baseline["write_rate"], 1e-3), 2),
        }
        for name in ("alone", "under_load"):
            print(
                f"bench: rebuild at {commands} {name}: {figures[f'rebuild_{name}_seconds']} s,"
                f" steps {json.dumps(figures[f'rebuild_{name}_steps'])},"
                f" seen {json.dumps(figures[f'rebuild_{name}_seen'])}",
                file=sys.stderr,
            )
        print(f"bench: rebuild at {commands}: {json.dumps(figures)}", file=sys.stderr)
        return figures

    def _pids(self) -> dict[str, int]:
        stack = self.bench.stack
        pids = {s.role: s.process.pid for s in self.services}
        for name, server in (("write-pg", stack.write_pg), ("read-pg", stack.read_pg)):
            if server.process is not None:
                pids[name] = server.process.pid
        pids["load-generator"] = os.getpid()
        return pids

    @contextlib.asynccontextmanager
    async def _observed(self, cpu: CpuMeter) -> AsyncIterator[dict[str, Any]]:
        """While the block runs: the CPU seconds of each process, the load average at both
        ends, and what the read DB's active sessions waited on (samples per application and
        wait event; the slowest queries seen, with their wait)."""
        seen: dict[str, Any] = {"load_avg_start": [round(x, 2) for x in os.getloadavg()]}
        waits: Counter[str] = Counter()
        slow: list[tuple[float, str]] = []
        backend_cpu: dict[int, tuple[str, float]] = {}  # pid: (application, CPU s as last seen)
        stop = asyncio.Event()

        async def sample() -> None:
            conn = await asyncpg.connect(plain_database_url(self.env["READ_DB_URL"]))
            try:
                while not stop.is_set():
                    for pid, app, state, wait, ms, query in await conn.fetch(_ACTIVITY):
                        with contextlib.suppress(psutil.Error):
                            t = psutil.Process(pid).cpu_times()
                            backend_cpu[pid] = (app or "-", t.user + t.system)
                        if state != "active":
                            continue
                        waits[f"{app or '-'} {wait}"] += 1
                        if ms is not None and float(ms) >= SLOW_QUERY_MS and app == "cqrs-api":
                            slow.append((round(float(ms), 1), f"{wait} {query}"))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), WAIT_SAMPLE_SECONDS)
            finally:
                await conn.close()

        cpu.mark()
        sampler = asyncio.create_task(sample())
        try:
            yield seen
        finally:
            stop.set()
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await sampler
            seen["cpu_s"] = cpu.mark()
            seen["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            seen["read_db_waits"] = dict(waits.most_common(12))
            # CPU seconds of the read DB's sessions by application (those of sessions opened
            # before the block included: the API's pool, the projector's).
            per_app: dict[str, float] = {}
            for app, used in backend_cpu.values():
                per_app[app] = per_app.get(app, 0.0) + used
            seen["read_db_session_cpu_s"] = {app: round(v, 2) for app, v in per_app.items()}
            seen["slow_api_queries"] = sorted(slow, reverse=True)[:8]

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


class CpuMeter:
    """CPU seconds (user + system) of named processes between marks; a PostgreSQL server's
    include its backends, the exited ones too (its postmaster's reaped children)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._last = self._now()

    def _now(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, proc in self._procs.items():
            try:
                t = proc.cpu_times()
                total = t.user + t.system
                if name.endswith("-pg"):
                    total += t.children_user + t.children_system
                    for child in proc.children():
                        with contextlib.suppress(psutil.Error):
                            c = child.cpu_times()
                            total += c.user + c.system
            except psutil.Error:
                total = self._last.get(name, 0.0) if hasattr(self, "_last") else 0.0
            totals[name] = total
        return totals

    def mark(self) -> dict[str, float]:
        """The CPU seconds each used since the last mark."""
        now = self._now()
        used = {name: round(now[name] - self._last.get(name, 0.0), 2) for name in now}
        self._last = now
        return used


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

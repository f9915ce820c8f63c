"""The benchmark's bounded phases, run in order against one stack; each returns its figures."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from cqrs_stack import sweep
from cqrs_stack.config import Settings, plain_database_url
from cqrs_stack.db import create_engine, create_pool
from cqrs_stack.projections.ledger import LedgerPruner
from cqrs_stack.projections.records import Records
from cqrs_stack.projector import CATCHUP_GRACE_SECONDS

from . import wrk
from .load import LoadResult, closed_loop, open_loop_writes, percentile
from .stack import BenchStack, ProcessMonitor


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run: the full benchmark or the quick CI variant."""

    name: str
    reference_seconds: int
    xadd_requests: int
    write_seconds: float
    read_seconds: float
    burst_writes: int
    lag_seconds: float
    key_space: int
    hung_seconds: float
    large_commands: int  # the large-data phase seeds this many commands, a tenth as many keys
    phases: tuple[str, ...]


_ALL = ("references", "ceiling", "writes", "reads", "hung-redis", "projection", "lag", "rebuild")
FULL = Plan(
    "full",
    10,
    200_000,
    15,
    15,
    50_000,
    20,
    20_000,
    10,
    10_000_000,
    (*_ALL, "rebuild-scale", "large", "ledger"),
)
# The quick run (CI) proves the phases work, at sizes that take seconds: the large-data phase
# at 20,000 commands (the full run's 10,000,000 take minutes to seed), its rebuild-scale
# phase at 20,000 commands (rebuild_scale.QUICK_SIZES).
QUICK = Plan(
    "quick", 2, 20_000, 2, 2, 1_500, 3, 1_000, 3, 20_000, (*_ALL, "rebuild-scale", "large")
)

VALUE = "v" * 64
# Seconds after the large phase's load before the sweep's plan is read (its interval is 2 s).
CATCHUP_SETTLE_SECONDS = 3.0
# Seconds the large phase waits at most for its ledger to be pruned to the seed's end (10M
# rows: about a minute on two busy cores).
LARGE_SETTLE_TIMEOUT = 600.0
# New commands behind the cursor whose sweep page is timed, at both sizes.
SWEEP_NEW_COMMANDS = 5_000


def ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded for the table."""
    return round(seconds * 1000, 2)


def cpu_per_request(used: dict[str, float], result: LoadResult) -> float:
    """Microseconds of the API process's CPU per request answered in a phase."""
    answered = max(1, result.requests - result.errors)
    return round(used.get("api", 0.0) / answered * 1e6, 1)


def cpu_per_request_by_process(used: dict[str, float], result: LoadResult) -> dict[str, float]:
    """Microseconds of each process's CPU (API, projector, each PostgreSQL, Redis) per request
    answered: the figure that the machine's other load moves least."""
    answered = max(1, result.requests - result.errors)
    return {name: round(seconds / answered * 1e6, 1) for name, seconds in used.items()}


def summary(result: LoadResult) -> dict[str, Any]:
    """Rate, counts and latency percentiles of a load phase, and which client measured it."""
    quantiles: list[float]
    if isinstance(result, wrk.WrkResult):
        quantiles = [result.p50, result.p90, result.p99, result.max]
    else:
        quantiles = [percentile(result.latencies, q) for q in (50, 90, 99)]
        quantiles.append(max(result.latencies, default=0.0))
    return {
        "rate": round(result.rate, 1),
        "requests": result.requests,
        "errors": result.errors,
        "seconds": round(result.seconds, 2),
        "p50_ms": ms(quantiles[0]),
        "p90_ms": ms(quantiles[1]),
        "p99_ms": ms(quantiles[2]),
        "max_ms": ms(quantiles[3]),
        "client": "wrk" if isinstance(result, wrk.WrkResult) else "asyncio",
    }


class Bench:
    """Runs the phases of ``plan`` against ``stack`` and collects the figures."""

    def __init__(
        self, stack: BenchStack, plan: Plan, monitor: ProcessMonitor, client: str = "asyncio"
    ) -> None:
        self.stack = stack
        self.plan = plan
        self.monitor = monitor
        self.api = stack.services["api"]
        self.projector = stack.services["projector"]
        self.results: dict[str, Any] = {}
        self.rng = random.Random(5)
        self.write_conn: asyncpg.Connection | None = None
        self.read_conn: asyncpg.Connection | None = None
        self.client = client
        self.seeded = 0  # commands put in both databases by SQL, not through the API
        # The keys that writes pick from at random: printf-style format, how many.
        self.write_keys = ("user:%d", plan.key_space)

    async def connect(self) -> None:
        """Direct connections to both databases, for counts and polling."""
        self.write_conn = await asyncpg.connect(plain_database_url(self.stack.env["WRITE_DB_URL"]))
        self.read_conn = await asyncpg.connect(plain_database_url(self.stack.env["READ_DB_URL"]))

    async def close(self) -> None:
        """Close the direct connections."""
        for conn in (self.write_conn, self.read_conn):
            if conn is not None:
                await conn.close()

    # -- helpers -------------------------------------------------------------------------

    def write_request(self, client: int, i: int) -> tuple[str, str, bytes]:
        key_format, space = self.write_keys
        key = key_format % self.rng.randrange(space)
        return "POST", "/write", json.dumps({"key": key, "value": VALUE}).encode()

    async def commands(self) -> int:
        assert self.write_conn is not None
        return int(await self.write_conn.fetchval("SELECT count(*) FROM commands"))

    async def projected(self) -> int:
        assert self.read_conn is not None
        # Seeded commands (large-data phase) are in the read model without a projector.
        return self.seeded + int(
            await self.read_conn.fetchval(
                "SELECT coalesce(sum(events_projected), 0) FROM projector_consumers"
            )
        )

    async def wait_projected(self, target: int, timeout: float, poll: float = 0.005) -> float:
        """Wait until the read model holds ``target`` commands; return the seconds it took."""
        started = time.perf_counter()
        deadline = started + timeout
        while await self.projected() < target:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"projection did not reach {target} in {timeout}s")
            await asyncio.sleep(poll)
        return time.perf_counter() - started

    # -- phases --------------------------------------------------------------------------

    async def _load(
        self, clients: int, seconds: float, kind: str, paths: list[str] | None = None
    ) -> LoadResult:
        """One closed-loop phase by the reference client: wrk where installed, else ours.

        ``kind``: "health", "writes" or "reads" (a random path of ``paths``).
        """
        if self.client == "wrk":
            port = self.api.port
            if kind == "health":
                return await asyncio.to_thread(wrk.get, port, clients, seconds, "/health")
            if kind == "writes":
                key_format, space = self.write_keys
                return await asyncio.to_thread(
                    wrk.writes, port, clients, seconds, space, key_format
                )
            assert paths is not None
            keys = [p[len("/read/") :] for p in paths]
            return await asyncio.to_thread(wrk.reads, port, clients, seconds, keys)
        if kind == "health":
            return await closed_loop(
                self.api.port, clients, seconds, lambda c, i: ("GET", "/health", b"")
            )
        if kind == "writes":
            return await closed_loop(self.api.port, clients, seconds, self.write_request)
        assert paths is not None
        return await closed_loop(
            self.api.port,
            clients,
            seconds,
            lambda c, i: ("GET", paths[self.rng.randrange(len(paths))], b""),
        )

    async def framework_ceiling(self) -> None:
        """GET /health at 64 clients: one API process's HTTP ceiling (no database, no route)."""
        self.monitor.mark("before-ceiling")
        result = await self._load(64, max(2.0, self.plan.read_seconds / 3), "health")
        used = self.monitor.mark("ceiling")
        self.results["api_ceiling"] = summary(result)
        self.results["api_ceiling"]["api_cpu_us_per_request"] = cpu_per_request(used, result)
        print(f"bench: /health ceiling c=64: {self.results['api_ceiling']}", file=sys.stderr)

    async def writes(self, clients_list: tuple[int, ...] = (1, 16, 64), label: str = "") -> None:
        """Closed-loop writes at 1, 16 and 64 clients; /health probed during 64."""
        figures = {}
        for clients in clients_list:
            probe = None
            if clients == 64:
                probe = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.bench.probe",
                        str(self.api.port),
                        str(self.plan.write_seconds),
                        "0.02",
                    ],
                    stdout=subprocess.PIPE,
                )
            self.monitor.mark(f"before-writes{label}-{clients}")
            batches_before = await self.batch_counts()
            result = await self._load(clients, self.plan.write_seconds, "writes")
            used = self.monitor.mark(f"writes{label}-{clients}")
            batches_after = await self.batch_counts()
            figures[clients] = summary(result)
            figures[clients]["api_cpu_us_per_request"] = cpu_per_request(used, result)
            figures[clients]["cpu_us_per_request"] = cpu_per_request_by_process(used, result)
            figures[clients]["loadavg"] = os.getloadavg()[0]
            batches = batches_after[0] - batches_before[0]
            figures[clients]["mean_batch"] = round(
                (batches_after[1] - batches_before[1]) / max(batches, 1), 1
            )
            if probe is not None:
                out, _ = probe.communicate(timeout=60)
                health = json.loads(out or b"[]")
                self.results[f"health_during_writes{label}"] = {
                    "samples": len(health),
                    "p50_ms": ms(percentile(health, 50)),
                    "p99_ms": ms(percentile(health, 99)),
                    "max_ms": ms(max(health, default=0.0)),
                }
            print(f"bench: writes{label} c={clients}: {figures[clients]}", file=sys.stderr)
        self.results[f"writes{label}"] = figures

    async def batch_counts(self) -> tuple[float, float]:
        """The API's group-commit batches so far and the commands in them (from /metrics)."""
        count = total = 0.0
        async with httpx.AsyncClient(base_url=self.api.url, timeout=30) as client:
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("cqrs_write_batch_size_count "):
                    count = float(line.split()[1])
                elif line.startswith("cqrs_write_batch_size_sum "):
                    total = float(line.split()[1])
        return count, total

    async def record_keys(self, limit: int) -> list[str]:
        """Up to ``limit`` keys of the read model, spread over it (a random sample)."""
        assert self.read_conn is not None
        total = await self.read_conn.fetchval("SELECT count(*) FROM records")
        if total <= limit:
            rows = await self.read_conn.fetch("SELECT key FROM records")
        else:
            share = min(100.0, 100.0 * limit * 1.5 / total)
            rows = await self.read_conn.fetch(
                f"SELECT key FROM records TABLESAMPLE SYSTEM ({share:.4f}) LIMIT $1", limit
            )
        return [r["key"] for r in rows]

    async def reads(self, label: str = "", hot: bool = True) -> None:
        """Reads of existing keys (spread) and of one hot key at 64 clients; counts exact?

        The rate is the reference client's; ``read_count`` is checked on a run of our own
        client (it finishes every request it sends, wrk does not: see wrk.py).
        """
        assert self.read_conn is not None
        await self.wait_projected(await self.commands(), 120)
        keys = await self.record_keys(100_000)
        hot_key = keys[0]
        paths = [f"/read/{k}" for k in keys]
        found = lambda status, body: status == 200 and b'"success":true' in body  # noqa: E731
        figures: dict[str, Any] = {}
        cases = [("spread", paths)] + ([("hot", [f"/read/{hot_key}"])] if hot else [])
        for name, chosen in cases:
            self.monitor.mark(f"before-reads{label}-{name}")
            loaded = await self._load(64, self.plan.read_seconds, "reads", chosen)
            used = self.monitor.mark(f"reads{label}-{name}")
            rate = summary(loaded)
            rate["api_cpu_us_per_request"] = cpu_per_request(used, loaded)
            rate["cpu_us_per_request"] = cpu_per_request_by_process(used, loaded)
            rate["loadavg"] = os.getloadavg()[0]
            await asyncio.sleep(0.5)  # let the API flush earlier read counts
            before_total = await self.read_conn.fetchval(
                "SELECT sum(read_count) FROM records WHERE key = ANY($1)", keys
            )
            check_seconds = max(2.0, self.plan.read_seconds / 3)

            def pick(c: int, i: int, chosen: list[str] = chosen) -> tuple[str, str, bytes]:
                return "GET", chosen[self.rng.randrange(len(chosen))], b""

            result = await closed_loop(self.api.port, 64, check_seconds, pick, ok=found)
            await asyncio.sleep(1.0)  # READ_COUNT_FLUSH_INTERVAL is 0.2 s
            after_total = await self.read_conn.fetchval(
                "SELECT sum(read_count) FROM records WHERE key = ANY($1)", keys
            )
            counted = int(after_total - before_total)
            answered = result.requests - result.errors
            figures[name] = {
                **rate,
                "read_count_added": counted,
                "reads_answered": answered,
                "read_count_exact": counted == answered,
                "check_client_rate": round(result.rate, 1),
            }
            print(f"bench: reads{label} {name}: {figures[name]}", file=sys.stderr)
        self.results[f"reads{label}"] = figures

    async def projection_drain(self) -> None:
        """Pause the projector (SIGSTOP), write a burst, resume (SIGCONT), time the drain."""
        await self.wait_projected(await self.commands(), 120)
        before = await self.projected()
        self.projector.pause()
        try:
            burst = await closed_loop(
                self.api.port, 64, 600, self.write_request, max_requests=self.plan.burst_writes
            )
            target = await self.commands()
            self.monitor.mark("burst-writes")
        finally:
            self.projector.resume()
        seconds = await self.wait_projected(target, 300, poll=0.01)
        self.monitor.mark("drain")
        events = target - before
        self.results["projection"] = {
            "events": events,
            "seconds": round(seconds, 3),
            "rate": round(events / seconds, 1),
            "burst_write_rate": round(burst.rate, 1),
        }
        print(f"bench: projection: {self.results['projection']}", file=sys.stderr)

    async def visibility_lag(self) -> None:
        """Open-loop writes at half the peak write rate; time from answer to in the read DB."""
        assert self.read_conn is not None
        await self.wait_projected(await self.commands(), 120)
        peak = max(f["rate"] for f in self.results["writes"].values())
        rate = max(10.0, peak / 2)
        pending: dict[int, float] = {}
        lags: list[float] = []
        done = asyncio.Event()

        def on_ack(position: int, acked: float) -> None:
            pending[position] = acked

        async def poll() -> None:
            assert self.read_conn is not None
            while not (done.is_set() and not pending):
                if pending:
                    rows = await self.read_conn.fetch(
                        "SELECT command_id FROM applied_commands WHERE command_id = ANY($1)",
                        list(pending),
                    )
                    seen = time.perf_counter()
                    for row in rows:
                        lags.append(seen - pending.pop(row["command_id"]))
                await asyncio.sleep(0.002)

        poller = asyncio.create_task(poll())
        writes = await open_loop_writes(
            self.api.port,
            rate,
            self.plan.lag_seconds,
            lambda n: self.write_request(0, n),
            on_ack,
        )
        done.set()
        try:
            await asyncio.wait_for(poller, 60)
        except TimeoutError:
            poller.cancel()
        self.monitor.mark("lag")
        self.results["lag"] = {
            "write_rate_target": round(rate, 1),
            "write_rate": round(writes.rate, 1),
            "write_p99_ms": ms(percentile(writes.latencies, 99)),
            "samples": len(lags),
            "never_seen": len(pending),
            "poll_interval_ms": 2,
            **{f"p{q}_ms": ms(percentile(lags, q)) for q in (50, 90, 99, 99.9)},
            "max_ms": ms(max(lags, default=0.0)),
        }
        print(f"bench: lag: {self.results['lag']}", file=sys.stderr)

    async def rebuild(self) -> None:
        """``cqrs-stack rebuild`` of everything written so far; read counts kept, model right."""
        assert self.read_conn is not None
        await self.wait_projected(await self.commands(), 120)
        await asyncio.sleep(0.5)
        total = await self.commands()
        reads_before = await self.read_conn.fetchval("SELECT sum(read_count) FROM records")
        startup = await asyncio.to_thread(
            self._python_seconds, "import cqrs_stack.cli, cqrs_stack.rebuild, cqrs_stack.db"
        )
        wall = await asyncio.to_thread(self.stack.cli, "rebuild")
        self.monitor.mark("rebuild")
        reads_after = await self.read_conn.fetchval("SELECT sum(read_count) FROM records")
        verify = await asyncio.to_thread(self._verify)
        self.results["rebuild"] = {
            "commands": total,
            "wall_seconds": round(wall, 3),
            "interpreter_start_seconds": round(startup, 3),
            "rate": round(total / wall, 1),
            "rate_excluding_start": round(total / max(wall - startup, 1e-3), 1),
            "read_counts_kept": reads_before == reads_after,
            "verify_ok": verify,
        }
        print(f"bench: rebuild: {self.results['rebuild']}", file=sys.stderr)

    def _python_seconds(self, code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        return time.perf_counter() - started

    def _verify(self) -> bool:
        try:
            self.stack.cli("verify")
        except subprocess.CalledProcessError:
            return False
        return True

    async def hung_redis(self) -> None:
        """Writes at 64 clients while the stack's Redis is SIGSTOPped (hung: it accepts, never
        answers), then SIGCONT; the rate against the normal one, and the time until every
        queued event is published."""
        assert self.write_conn is not None
        redis = self.stack.redis.process
        assert redis is not None
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            result = await self._load(64, self.plan.hung_seconds, "writes")
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        self.monitor.mark("hung-redis")
        started = time.perf_counter()
        deadline = started + 120
        query = "SELECT count(*) FROM commands WHERE NOT published"
        queued = int(await self.write_conn.fetchval(query))
        while await self.write_conn.fetchval(query):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.05)
        figures = summary(result)
        normal = self.results.get("writes", {}).get(64, {}).get("rate")
        self.results["hung_redis"] = {
            **figures,
            "normal_rate": normal,
            "ratio": round(figures["rate"] / normal, 3) if normal else None,
            "queued_at_resume": queued,
            "published_after_resume_seconds": round(time.perf_counter() - started, 2),
        }
        print(f"bench: hung redis: {self.results['hung_redis']}", file=sys.stderr)

    async def sweep_plan(self, new: int = SWEEP_NEW_COMMANDS) -> dict[str, Any]:
        """EXPLAIN ANALYZE of the catch-up sweep's page query from a cursor ``new`` commands
        behind the last one: what a sweep tick reads when that many commands are new."""
        assert self.write_conn is not None
        row = await self.write_conn.fetchrow(
            "SELECT txid::text AS txid, id AS cursor_id FROM commands"
            " ORDER BY id DESC OFFSET $1 LIMIT 1",
            new,
        )
        if row is None:  # fewer commands than that: the sweep of every one
            row = {"txid": 0, "cursor_id": 0}
        sql = (
            str(sweep.AFTER_CURSOR)
            .replace(":grace", str(float(CATCHUP_GRACE_SECONDS)))
            .replace(":txid", f"'{int(row['txid'])}'::xid8")
            .replace(":position", str(int(row["cursor_id"])))
            .replace(":limit", str(max(50_000, 4 * 256)))
        )
        lines = [r[0] for r in await self.write_conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")]
        executed = next((x for x in lines if x.startswith("Execution Time")), "")
        rows = await self.write_conn.fetchval(f"SELECT count(*) FROM ({sql}) AS page")
        return {
            "plan": lines,
            "uses_index": any("commands_txid_id_idx" in x for x in lines),
            "execution_ms": float(executed.split(":")[1].split()[0]) if executed else None,
            "candidates": int(rows),
        }

    async def stats_timing(self, samples: int = 5) -> dict[str, Any]:
        """GET /stats a few times: its latency and whether its counts were estimated."""
        times: list[float] = []
        body: dict[str, Any] = {}
        async with httpx.AsyncClient(base_url=self.api.url, timeout=30) as client:
            for _ in range(samples):
                started = time.perf_counter()
                answer = await client.get("/stats")
                times.append(time.perf_counter() - started)
                body = answer.json()
        return {
            "p50_ms": ms(percentile(times, 50)),
            "max_ms": ms(max(times)),
            "counts_estimated": body.get("counts_estimated"),
            "write_db_records": body.get("write_db_records"),
            "read_db_records": body.get("read_db_records"),
        }

    def db_activity(self) -> DbActivity:
        """A sampler of both servers' active backends."""
        return DbActivity(
            {
                "write-db": plain_database_url(self.stack.env["WRITE_DB_URL"]),
                "read-db": plain_database_url(self.stack.env["READ_DB_URL"]),
            }
        )

    async def prune_ledger(self, last: int, timeout: float = LARGE_SETTLE_TIMEOUT) -> float:
        """Prune the records ledger with the product's pruner until its watermark is at
        ``last`` (the seed's last command) or above; the seconds it took. The projector's
        pruner runs too: the two take each step's lock in turn, either may do a step."""
        settings = Settings(
            write_db_url=self.stack.env["WRITE_DB_URL"], read_db_url=self.stack.env["READ_DB_URL"]
        )
        engine = create_engine(settings.write_db_url, settings, application_name="bench-large")
        pool = await create_pool(settings.read_db_url, settings, application_name="bench-large")
        watermark = f"SELECT position FROM {Records.watermark()}"
        started = time.perf_counter()
        try:
            pruner = LedgerPruner(engine, pool, [Records], settings.ledger_prune_step)
            while int(await pool.fetchval(watermark)) < last:
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"the ledger's watermark did not reach {last}")
                if not await pruner.prune_round() and not pruner.behind:
                    await asyncio.sleep(0.05)  # the fence's writers are still open
        finally:
            await pool.close()
            await engine.dispose()
        return time.perf_counter() - started

    async def settle_large(self, pruned_seconds: float) -> dict[str, Any]:
        """The steady state of a stack at the large size, once its ledger is pruned below the
        seed's end: ``VACUUM (ANALYZE)`` of both databases, as autovacuum keeps a production
        stack's tables (the load's rows all-visible, the pruned ledger's space reclaimed)."""
        assert self.write_conn is not None and self.read_conn is not None
        started = time.perf_counter()
        await self.write_conn.execute("VACUUM (ANALYZE)")
        vacuum_write = time.perf_counter() - started
        started = time.perf_counter()
        await self.read_conn.execute("VACUUM (ANALYZE)")
        vacuum_read = time.perf_counter() - started
        self.monitor.mark("large-settle")
        ledger_rows = int(await self.read_conn.fetchval(f"SELECT count(*) FROM {Records.ledger}"))
        return {
            "ledger_pruned_seconds": round(pruned_seconds, 1),
            "ledger_rows_left": ledger_rows,
            "vacuum_write_db_seconds": round(vacuum_write, 1),
            "vacuum_read_db_seconds": round(vacuum_read, 1),
        }

    async def large_data(self) -> None:
        """Seed the write DB with ``large_commands`` commands and the read model with a tenth
        as many keys (SQL, not the API), then run the write and read phases again: the same
        figures as with the small data set, /stats in bounds, the sweep's cost unchanged.

        Right after the bulk load, writes c=64 are measured once as the transient (autovacuum
        of the new rows, the product's pruner working off the load's ledger rows:
        ``writes-large-transient``); then the stack is brought to the state a production stack
        of that size is in (the ledger pruned below its watermark, every table vacuumed and
        analyzed) and the steady-state phases run: writes to the small run's keys, writes
        spread over the seeded keys, spread reads. The servers' activity is sampled in each.
        """
        assert self.write_conn is not None and self.read_conn is not None
        small = {
            "sweep": await self.sweep_plan(),
            "stats": await self.stats_timing(),
        }
        n = self.plan.large_commands
        keys = max(1, n // 10)
        seeded = keys * 10
        # Every command so far projected: the ledger's watermark can then rise past the seed.
        await self.wait_projected(await self.commands(), 120)
        seed = await seed_large(self.write_conn, self.read_conn, keys)
        last, seed_txid = seed.last, seed.txid
        seeded_read, seeded_write = seed.read_seconds, seed.write_seconds
        await self.read_conn.execute(
            "UPDATE projector_catchup SET cursor_txid = $1::text::xid8, cursor_id = $2"
            " WHERE (cursor_txid, cursor_id) < ($1::text::xid8, $2)",
            seed_txid,
            last,
        )
        self.seeded = seeded
        started = time.perf_counter()
        await self.write_conn.execute("ANALYZE commands")
        await self.read_conn.execute("ANALYZE records; ANALYZE applied_commands")
        analyzed = time.perf_counter() - started
        self.monitor.mark("large-seed")
        print(
            f"bench: seeded {n} commands in {seeded_write:.1f} s, {keys} keys and {n} ledger"
            f" rows in {seeded_read:.1f} s (ANALYZE {analyzed:.1f} s)",
            file=sys.stderr,
        )
        # The transient after a bulk load (or a rebuild): writes while the product's pruner
        # works off the load's ledger rows (started now rather than at the projector's next
        # interval, so that it runs in this window), and what the servers do meanwhile.
        activity = self.db_activity()
        await activity.start()
        pruning = asyncio.create_task(self.prune_ledger(last))
        try:
            await self.writes((64,), label="-large-transient")
        except BaseException:
            pruning.cancel()
            raise
        finally:
            transient_activity = await activity.stop()
        print(f"bench: activity writes-large-transient: {transient_activity}", file=sys.stderr)
        steady = await self.settle_large(await pruning)
        print(f"bench: large steady state: {steady}", file=sys.stderr)
        activity = self.db_activity()
        await activity.start()
        await self.writes((64,), label="-large")
        writes_activity = await activity.stop()
        # The same writes spread over the seeded keys: random inserts into the key index of
        # 10M entries and updates of 1M key versions, not only into the small set's key range.
        activity = self.db_activity()
        await activity.start()
        self.write_keys = (_SEED_KEY_FORMAT, keys)
        try:
            await self.writes((64,), label="-large-seeded-keys")
        finally:
            self.write_keys = ("user:%d", self.plan.key_space)
            seeded_keys_activity = await activity.stop()
        activity = self.db_activity()
        await activity.start()
        await self.reads(label="-large", hot=False)
        reads_activity = await activity.stop()
        print(
            f"bench: activity writes-large: {writes_activity}; writes-large-seeded-keys:"
            f" {seeded_keys_activity}; reads-large: {reads_activity}",
            file=sys.stderr,
        )
        await asyncio.sleep(CATCHUP_SETTLE_SECONDS)  # a sweep tick or two at the new size
        large = {"sweep": await self.sweep_plan(), "stats": await self.stats_timing()}
        small_w, large_w = self.results["writes"][64], self.results["writes-large"][64]
        transient_w = self.results["writes-large-transient"][64]
        seeded_w = self.results["writes-large-seeded-keys"][64]
        small_r, large_r = self.results["reads"]["spread"], self.results["reads-large"]["spread"]
        self.results["large"] = {
            "commands": n,
            "keys": keys,
            "seed_write_db_seconds": round(seeded_write, 1),
            "seed_read_db_seconds": round(seeded_read, 1),
            "analyze_seconds": round(analyzed, 1),
            "steady_state": steady,
            "activity": {
                "writes-large-transient": transient_activity,
                "writes-large": writes_activity,
                "writes-large-seeded-keys": seeded_keys_activity,
                "reads-large": reads_activity,
            },
            "small": small,
            "large": large,
            "write_rate_ratio": round(large_w["rate"] / small_w["rate"], 3),
            "write_p99_ratio": round(large_w["p99_ms"] / max(small_w["p99_ms"], 1e-3), 3),
            "read_rate_ratio": round(large_r["rate"] / small_r["rate"], 3),
            "read_p99_ratio": round(large_r["p99_ms"] / max(small_r["p99_ms"], 1e-3), 3),
            "seeded_keys_write_rate_ratio": round(seeded_w["rate"] / small_w["rate"], 3),
            "seeded_keys_write_p99_ratio": round(
                seeded_w["p99_ms"] / max(small_w["p99_ms"], 1e-3), 3
            ),
            "transient_write_rate_ratio": round(transient_w["rate"] / small_w["rate"], 3),
            "transient_write_p99_ratio": round(
                transient_w["p99_ms"] / max(small_w["p99_ms"], 1e-3), 3
            ),
        }
        print(
            "bench: large data: "
            + json.dumps(
                {
                    k: v
                    for k, v in self.results["large"].items()
                    if k not in ("small", "large", "activity")
                }
            ),
            file=sys.stderr,
        )
        # Peak RSS of the API and the projector in each phase at both sizes: flat with the data?
        rss = self.monitor.phase_rss_mb
        self.results["large"]["peak_rss_mb"] = {
            phase: {name: rss[phase].get(name) for name in ("api", "projector")}
            for phase in _RSS_PHASES
            if phase in rss
        }
        for phase, figures in self.results["large"]["peak_rss_mb"].items():
            print(
                f"bench: peak RSS {phase}: api {figures['api']} MB,"
                f" projector {figures['projector']} MB",
                file=sys.stderr,
            )
        for size in ("small", "large"):
            sweep_figures = self.results["large"][size]["sweep"]
            print(
                f"bench: sweep at {size}: index={sweep_figures['uses_index']}"
                f" {sweep_figures['execution_ms']} ms for {sweep_figures['candidates']}"
                f" candidates; /stats {self.results['large'][size]['stats']}",
                file=sys.stderr,
            )


@dataclass(frozen=True)
class Seed:
    """What ``seed_large`` put in: the ids ``first``..``last``, the write DB's transaction,
    and the seconds each database's part took."""

    first: int
    last: int
    txid: str
    read_seconds: float
    write_seconds: float


async def seed_large(
    write_conn: asyncpg.Connection,
    read_conn: asyncpg.Connection,
    keys: int,
    in_window: Callable[[], Awaitable[object]] | None = None,
) -> Seed:
    """Seed ``keys`` keys of ten commands each: the commands and key versions in the write
    DB (one transaction), the records and ledger rows in the read model.

    The seeded commands' events count as published and projected: the read model holds
    their keys and ledger rows before the commands are committed, so that a sweep that
    meets them finds nothing missing (the caller then moves the sweep's cursor past them,
    as after a sweep). The seed is one writer as the ledger's pruning expects one: it holds its
    lock on ``commands`` from before it draws its ids until it commits, so a pruning
    fence taken meanwhile stays open, and the watermark cannot rise over ids whose
    commands are not committed yet (it would leave the seed's ledger rows below it, for
    one later step to delete all at once).

    ``in_window`` (tests) runs once the read model's rows are written, before they commit
    and before the commands are written.
    """
    seeded = keys * 10
    async with write_conn.transaction():  # one transaction, one txid, like a bulk load
        await write_conn.execute("LOCK TABLE commands IN ROW EXCLUSIVE MODE")
        first = int(
            await write_conn.fetchval(
                "SELECT setval(pg_get_serial_sequence('commands', 'id'),"
                " nextval(pg_get_serial_sequence('commands', 'id')) + $1) - $1",
                seeded - 1,
            )
        )
        last = first + seeded - 1
        started = time.perf_counter()
        async with read_conn.transaction():
            await read_conn.execute(_SEED_RECORDS, first, keys)
            await read_conn.execute(_SEED_LEDGER, first, last)
            if in_window is not None:
                await in_window()
        read_seconds = time.perf_counter() - started
        started = time.perf_counter()
        await write_conn.execute(_SEED_COMMANDS, first, keys)
        await write_conn.execute(_SEED_KEY_VERSIONS, keys)
        txid = str(await write_conn.fetchval("SELECT pg_current_xact_id()::text"))
    return Seed(first, last, txid, read_seconds, time.perf_counter() - started)


class DbActivity:
    """What the two PostgreSQL servers run during a phase: every ``interval`` seconds, the
    active backends other than this one (autovacuum workers, the projector's ledger pruning,
    the write path's statements), counted by backend type and the start of their query.

    Bounded: one sample per interval until ``stop``; its own connections, closed at stop.
    """

    _ACTIVE = (
        "SELECT backend_type, left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 60)"
        " FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
        " AND datname = current_database()"
    )

    def __init__(self, urls: dict[str, str], interval: float = 0.25) -> None:
        self.urls = urls
        self.interval = interval
        self.counts: dict[str, dict[str, int]] = {name: {} for name in urls}
        self.samples = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and sample in a task until ``stop``."""
        conns = {name: await asyncpg.connect(url) for name, url in self.urls.items()}
        self._task = asyncio.create_task(self._sample(conns))

    async def _sample(self, conns: dict[str, asyncpg.Connection]) -> None:
        try:
            while not self._stop.is_set():
                for name, conn in conns.items():
                    for backend, query in await conn.fetch(self._ACTIVE):
                        what = f"{backend}: {query}"
                        self.counts[name][what] = self.counts[name].get(what, 0) + 1
                self.samples += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                except TimeoutError:
                    pass
        finally:
            for conn in conns.values():
                await conn.close()

    async def stop(self, top: int = 6) -> dict[str, Any]:
        """Stop sampling; the ``top`` most frequent activities of each server, as a share of
        the samples (1.0: one backend busy with it in every sample)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return {
            "samples": self.samples,
            **{
                name: {
                    what: round(n / max(self.samples, 1), 2)
                    for what, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]
                }
                for name, counts in self.counts.items()
            },
        }


# The phases whose peak RSS the large-data phase prints: small, seeding, large.
_RSS_PHASES = (
    "writes-64",
    "reads-spread",
    "large-seed",
    "writes-large-transient-64",
    "writes-large-64",
    "writes-large-seeded-keys-64",
    "reads-large-spread",
)

# Seeding, in SQL: ten commands per key, keys in index order (zero-padded), so that the key
# index is built at its right edge; one transaction, like a bulk load.
_SEED_COMMANDS = """
    INSERT INTO commands (id, key, value, event_type, published)
    SELECT $1 + g, 'seed:' || lpad((g / 10)::text, 8, '0'), repeat('v', 64),
           CASE WHEN g % 10 = 0 THEN 'RecordCreated' ELSE 'RecordUpdated' END, true
    FROM generate_series(0, $2::bigint * 10 - 1) AS g
"""
# The seeded keys' names (printf-style, as _SEED_COMMANDS writes them) and their versions.
_SEED_KEY_FORMAT = "seed:%08d"
_SEED_KEY_VERSIONS = """
    INSERT INTO key_versions (key, version)
    SELECT 'seed:' || lpad(k::text, 8, '0'), 10 FROM generate_series(0, $1 - 1) AS k
"""
_SEED_RECORDS = """
    INSERT INTO records (key, value, created_at, updated_at, read_count, write_count,
                         first_command_id, last_command_id)
    SELECT 'seed:' || lpad(k::text, 8, '0'), repeat('v', 64), now(), now(), 0, 10,
           $1 + k * 10, $1 + k * 10 + 9
    FROM generate_series(0, $2 - 1) AS k
"""
_SEED_LEDGER = """
    INSERT INTO applied_commands (command_id) SELECT g FROM generate_series($1::bigint, $2) g
"""

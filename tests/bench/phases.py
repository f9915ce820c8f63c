"""The benchmark's bounded phases, run in order against one stack; each returns its figures."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from cqrs_stack.config import plain_database_url

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


FULL = Plan("full", 10, 200_000, 15, 15, 50_000, 20, 20_000)
QUICK = Plan("quick", 2, 20_000, 2, 2, 1_500, 3, 1_000)

VALUE = "v" * 64


def ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded for the table."""
    return round(seconds * 1000, 2)


def summary(result: LoadResult) -> dict[str, Any]:
    """Rate, counts and latency percentiles of a load phase."""
    return {
        "rate": round(result.rate, 1),
        "requests": result.requests,
        "errors": result.errors,
        "seconds": round(result.seconds, 2),
        "p50_ms": ms(percentile(result.latencies, 50)),
        "p90_ms": ms(percentile(result.latencies, 90)),
        "p99_ms": ms(percentile(result.latencies, 99)),
        "max_ms": ms(max(result.latencies, default=0.0)),
    }


class Bench:
    """Runs the phases of ``plan`` against ``stack`` and collects the figures."""

    def __init__(self, stack: BenchStack, plan: Plan, monitor: ProcessMonitor) -> None:
        self.stack = stack
        self.plan = plan
        self.monitor = monitor
        self.api = stack.services["api"]
        self.projector = stack.services["projector"]
        self.results: dict[str, Any] = {}
        self.rng = random.Random(5)
        self.write_conn: asyncpg.Connection | None = None
        self.read_conn: asyncpg.Connection | None = None

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
        key = f"user:{self.rng.randrange(self.plan.key_space)}"
        return "POST", "/write", json.dumps({"key": key, "value": VALUE}).encode()

    async def commands(self) -> int:
        assert self.write_conn is not None
        return int(await self.write_conn.fetchval("SELECT count(*) FROM commands"))

    async def projected(self) -> int:
        assert self.read_conn is not None
        return int(
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

    async def framework_ceiling(self) -> None:
        """GET /health at 64 clients: one API process's HTTP ceiling (no database, no route)."""
        result = await closed_loop(
            self.api.port,
            64,
            max(2.0, self.plan.read_seconds / 3),
            lambda c, i: ("GET", "/health", b""),
        )
        self.monitor.mark("ceiling")
        self.results["api_ceiling"] = summary(result)
        print(f"bench: /health ceiling c=64: {self.results['api_ceiling']}", file=sys.stderr)

    async def writes(self) -> None:
        """Closed-loop writes at 1, 16 and 64 clients; /health probed during 64."""
        figures = {}
        for clients in (1, 16, 64):
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
            result = await closed_loop(
                self.api.port, clients, self.plan.write_seconds, self.write_request
            )
            figures[clients] = summary(result)
            self.monitor.mark(f"writes-{clients}")
            if probe is not None:
                out, _ = probe.communicate(timeout=60)
                health = json.loads(out or b"[]")
                self.results["health_during_writes"] = {
                    "samples": len(health),
                    "p50_ms": ms(percentile(health, 50)),
                    "p99_ms": ms(percentile(health, 99)),
                    "max_ms": ms(max(health, default=0.0)),
                }
            print(f"bench: writes c={clients}: {figures[clients]}", file=sys.stderr)
        self.results["writes"] = figures

    async def reads(self) -> None:
        """Reads of existing keys (spread) and of one hot key at 64 clients; counts exact?"""
        assert self.read_conn is not None
        await self.wait_projected(await self.commands(), 120)
        keys = [r["key"] for r in await self.read_conn.fetch("SELECT key FROM records")]
        hot = keys[0]
        paths = [f"/read/{k}" for k in keys]
        found = lambda status, body: status == 200 and b'"success":true' in body  # noqa: E731
        figures: dict[str, Any] = {}
        for name, make in (
            ("spread", lambda c, i: ("GET", paths[self.rng.randrange(len(paths))], b"")),
            ("hot", lambda c, i: ("GET", f"/read/{hot}", b"")),
        ):
            await asyncio.sleep(0.5)  # let the API flush earlier read counts
            before_total = await self.read_conn.fetchval("SELECT sum(read_count) FROM records")
            before_hot = await self.read_conn.fetchval(
                "SELECT read_count FROM records WHERE key = $1", hot
            )
            result = await closed_loop(self.api.port, 64, self.plan.read_seconds, make, ok=found)
            self.monitor.mark(f"reads-{name}")
            await asyncio.sleep(1.0)  # READ_COUNT_FLUSH_INTERVAL is 0.2 s
            after_total = await self.read_conn.fetchval("SELECT sum(read_count) FROM records")
            after_hot = await self.read_conn.fetchval(
                "SELECT read_count FROM records WHERE key = $1", hot
            )
            counted = after_hot - before_hot if name == "hot" else after_total - before_total
            answered = result.requests - result.errors
            figures[name] = {
                **summary(result),
                "read_count_added": int(counted),
                "reads_answered": answered,
                "read_count_exact": int(counted) == answered,
            }
            print(f"bench: reads {name}: {figures[name]}", file=sys.stderr)
        self.results["reads"] = figures

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

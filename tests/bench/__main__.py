"""``python -m tests.bench [--quick] [--out .bench]``: run the benchmark and print the table."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import ledger, reference, report
from .phases import FULL, QUICK, Bench, Plan
from .stack import READ_DB, WRITE_DB, BenchStack, ProcessMonitor


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def measure_references(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """pgbench on the stack's own PostgreSQL servers and redis-benchmark on its Redis."""
    refs: dict[str, Any] = {
        "pgbench_insert_c16": reference.pgbench_insert(
            stack.write_pg, WRITE_DB, plan.reference_seconds
        ),
        "pgbench_select_c16": reference.pgbench_select(
            stack.read_pg, READ_DB, plan.reference_seconds
        ),
        "redis_xadd_c16": reference.redis_xadd(stack.redis, plan.xadd_requests),
    }
    if refs["redis_xadd_c16"] is None:
        print(
            "bench: redis-benchmark not found (apt-get install redis-tools); XADD reference"
            " skipped",
            file=sys.stderr,
        )
    for name, figure in refs.items():
        print(f"bench: reference {name}: {figure}", file=sys.stderr)
    return refs


async def run_phases(bench: Bench) -> None:
    """The bounded phases, in order."""
    await bench.connect()
    try:
        await bench.framework_ceiling()
        await bench.writes()
        await bench.reads()
        await bench.projection_drain()
        await bench.visibility_lag()
        await bench.rebuild()
        await ledger.ledger_phase(bench)
    finally:
        await bench.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    parser.add_argument("--out", default=".bench", help="folder for results.json/.png")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _install_uvloop()
    started = time.monotonic()
    stack = BenchStack.start(out / "run")
    try:
        stack.launch("api")
        stack.launch("projector")
        monitor = ProcessMonitor(stack.server_pids())
        monitor.start()
        results: dict[str, Any] = {
            "plan": plan.name,
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}",
            "durability": "PostgreSQL fsync=on, synchronous_commit=on; Redis appendfsync everysec",
            "reference": measure_references(stack, plan),
        }
        monitor.mark("reference")
        bench = Bench(stack, plan, monitor)
        asyncio.run(run_phases(bench))
        monitor.stop()
        results.update(bench.results)
        results["processes"] = {"peak_rss_mb": monitor.peak_rss_mb, "cpu": monitor.cpu}
        results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    finally:
        stack.stop()
    table = report.rows(results)
    results["table"] = table
    report.write_json(out / "results.json", results)
    report.write_chart(out / "results.png", results)
    print(report.render_table(table, results["processes"]))
    print(
        f"\nwritten: {out / 'results.json'}, {out / 'results.png'} ({results['elapsed_seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

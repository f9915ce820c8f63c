"""``python -m tests.bench [--quick] [--out .bench]``: run the benchmark and print the table."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import ledger, rebuild_scale, reference, report, wrk
from .phases import _ALL, FULL, QUICK, Bench, Plan
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


PHASES = (
    "references",
    "ceiling",
    "writes",
    "reads",
    "hung-redis",
    "projection",
    "lag",
    "rebuild",
    "rebuild-scale",
    "large",
    "ledger",
)


async def run_phases(
    bench: Bench, phases: tuple[str, ...], rebuild_scale_sizes: tuple[int, ...] | None = None
) -> None:
    """The bounded phases chosen, in their fixed order."""
    await bench.connect()
    try:
        if "ceiling" in phases:
            await bench.framework_ceiling()
        if "writes" in phases:
            await bench.writes()
        elif "writes-64" in phases:
            await bench.writes((64,))
        if "reads" in phases:
            await bench.reads()
        if "hung-redis" in phases:
            await bench.hung_redis()
        if "projection" in phases:
            await bench.projection_drain()
        if "lag" in phases:
            await bench.visibility_lag()
        if "rebuild" in phases:
            await bench.rebuild()
        if "rebuild-scale" in phases:
            await rebuild_scale.rebuild_scale_phase(bench, rebuild_scale_sizes)
        if "large" in phases:
            await bench.large_data()
        if "ledger" in phases:
            await ledger.ledger_phase(bench)
    finally:
        await bench.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    parser.add_argument("--out", default=".bench", help="folder for results.json/.png")
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="load generator: wrk where installed (auto), or our asyncio one",
    )
    parser.add_argument(
        "--phases",
        default="",
        help=f"comma-separated subset of {','.join(PHASES)} (default: all of the plan's;"
        " no table or chart for a subset, only results.json)",
    )
    parser.add_argument(
        "--large-commands",
        type=int,
        default=None,
        help="commands seeded for the large-data phase (full: 10,000,000; keys a tenth)",
    )
    parser.add_argument(
        "--rebuild-sizes",
        default="",
        help="commands of each rebuild-scale size, comma-separated (full: 1000000,10000000;"
        " quick: 100000)",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="length of each write and read phase"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        plan = dataclasses.replace(plan, write_seconds=args.seconds, read_seconds=args.seconds)
    if args.large_commands is not None:
        plan = dataclasses.replace(plan, large_commands=args.large_commands)
    phases = tuple(p for p in args.phases.split(",") if p) or plan.phases
    unknown = set(phases) - {*PHASES, "writes-64"}
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")
    client = args.client
    if client == "auto":
        client = "wrk" if wrk.binary() else "asyncio"
    elif client == "wrk" and wrk.binary() is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    print(
        f"bench: load generator: {client}"
        + ("" if client == "wrk" else " (wrk not found: apt-get install wrk)"),
        file=sys.stderr,
    )
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
            "load_generator": client,
            "reference": measure_references(stack, plan) if "references" in phases else {},
        }
        monitor.mark("reference")
        bench = Bench(stack, plan, monitor, client)
        sizes = tuple(int(n) for n in args.rebuild_sizes.split(",") if n) or None
        asyncio.run(run_phases(bench, phases, sizes))
        monitor.stop()
        results.update(bench.results)
        results["processes"] = {
            "peak_rss_mb": monitor.peak_rss_mb,
            "peak_rss_mb_by_phase": monitor.phase_rss_mb,
            "cpu": monitor.cpu,
        }
        results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    finally:
        stack.stop()
    if not set(_ALL) <= set(phases):  # the table needs every phase but "large"
        report.write_json(out / "results.json", results)
        print(f"\nwritten: {out / 'results.json'} ({results['elapsed_seconds']} s)")
        return 0
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

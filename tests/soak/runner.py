"""The chaos soak: steady traffic while faults hit real processes, then the invariants.

``python -m tests.soak`` (or ``make soak``); length from ``SOAK_SECONDS`` (default 300).
Everything runs on 127.0.0.1; every wait is bounded. Exit status 0 when every invariant held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY

from cqrs_stack.db import driver_of
from cqrs_stack.projections.base import applied_count
from cqrs_stack.projections.records import Records
from cqrs_stack.verify import differences

from .cluster import Cluster, start_cluster, stop_cluster
from .faults import POISON, SCHEDULE, WIPES_REDIS, FaultFailed
from .load import Load, Tally

FAULT_EVERY = 20.0  # seconds between faults in a long run
CONVERGE_WITHIN = 90.0  # longest wait for the stack to catch up after a fault
FINAL_WITHIN = 180.0  # longest wait for the final convergence
WRITES_PER_SECOND = 40.0
READS_PER_SECOND = 40.0

# Through the model's own test: a command below its watermark has no ledger row (pruned).
_APPLIED = text(f"SELECT p FROM unnest(:ids) AS p WHERE {Records.applied_test('p')}").bindparams(
    bindparam("ids", type_=ARRAY(BigInteger))
)
_STORED = text("SELECT id, key, value FROM commands WHERE id = ANY(:ids)").bindparams(
    bindparam("ids", type_=ARRAY(BigInteger))
)


@dataclass
class FaultResult:
    """One injected fault: when, what, and how long the stack took to catch up."""

    at: float
    kind: str
    note: str
    converged_after: float | None = None
    failure: str | None = None


@dataclass
class Verdict:
    """The end-of-run checks: each line is (held?, description)."""

    lines: list[tuple[bool, str]] = field(default_factory=list)
    final_convergence: float | None = None

    def check(self, held: bool, description: str) -> None:
        self.lines.append((held, description))

    @property
    def ok(self) -> bool:
        return all(held for held, _ in self.lines)


class Applied:
    """Which acknowledged positions the read model has applied (remembered, asked once each)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.seen: set[int] = set()

    async def missing(self, positions: set[int]) -> set[int]:
        """Positions of ``positions`` not applied yet; all of them if the read DB is down."""
        unknown = positions - self.seen
        if not unknown:
            return set()
        try:
            async with self.cluster.stack.read_engine.connect() as conn:
                rows = await conn.execute(_APPLIED, {"ids": sorted(unknown)})
                self.seen.update(row[0] for row in rows)
        except Exception:  # the read DB may be the fault right now
            return unknown
        return unknown - self.seen

    async def wait(self, positions: set[int], within: float) -> float | None:
        """Seconds until every position is applied, or None if ``within`` ran out."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if not await self.missing(positions):
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None


async def _dead_letters(cluster: Cluster) -> list[dict[bytes, bytes]]:
    try:
        entries = await cluster.stack.redis.xrange(cluster.settings.dead_letter_stream)
    except Exception:
        return []
    return [fields for _, fields in entries]


async def run_faults(
    cluster: Cluster, load: Load, applied: Applied, seconds: float, started: float
) -> tuple[list[FaultResult], int]:
    """Run the fault schedule over ``seconds``; return the results and the expected dead letters."""
    # Whole cycles only, so that the run ends with its poison event after the last wipe.
    count = len(SCHEDULE) * max(1, round(seconds / FAULT_EVERY / len(SCHEDULE)))
    spacing = seconds / (count + 1)
    results: list[FaultResult] = []
    poisons_since_wipe = 0
    for number in range(count):
        kind, fault = SCHEDULE[number % len(SCHEDULE)]
        delay = started + (number + 1) * spacing - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        at = time.monotonic() - started
        try:
            note = await asyncio.wait_for(fault(cluster, number), 120)
            failure = None
        except FaultFailed as exc:
            note, failure = "expectation failed", str(exc)
        except Exception as exc:  # a fault that could not be injected is a failed run too
            note, failure = "could not inject", f"{type(exc).__name__}: {exc}"
        result = FaultResult(at, kind, note, failure=failure)
        results.append(result)
        if fault in WIPES_REDIS:
            poisons_since_wipe = 0
        if kind == "poison event" and failure is None:
            poisons_since_wipe += 1
            result.converged_after = await _wait_dead_letters(cluster, poisons_since_wipe)
        else:
            result.converged_after = await applied.wait(
                set(load.tally.acknowledged), CONVERGE_WITHIN
            )
        print(_fault_line(result), flush=True)
    return results, poisons_since_wipe


async def _wait_dead_letters(cluster: Cluster, expected: int) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_WITHIN:
        if len(await _dead_letters(cluster)) >= expected:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    return None


async def final_checks(
    cluster: Cluster, tally: Tally, applied: Applied, expected_dead: int, faults: list[FaultResult]
) -> Verdict:
    """Wait (bounded) for convergence, then check every invariant against the write DB."""
    verdict = Verdict()
    stack = cluster.stack
    acknowledged = set(tally.acknowledged)
    started = time.monotonic()
    found: list[str] = ["not checked"]
    while time.monotonic() - started < FINAL_WITHIN:
        try:
            found = await differences(stack.write_engine, stack.read_engine)
        except Exception as exc:
            found = [f"could not compare: {exc}"]
        if not found and not await applied.missing(acknowledged):
            if len(await _dead_letters(cluster)) >= expected_dead:
                verdict.final_convergence = time.monotonic() - started
                break
        await asyncio.sleep(0.5)

    async with stack.write_engine.connect() as conn:
        stored = {
            row[0]: (row[1], row[2])
            for row in await conn.execute(_STORED, {"ids": sorted(acknowledged)})
        }
        commands = int(await conn.scalar(text("SELECT count(*) FROM commands")) or 0)
    lost = [p for p in acknowledged if stored.get(p) != tally.acknowledged[p]]
    verdict.check(
        not lost,
        f"every acknowledged write ({len(acknowledged)}) is in the write DB with its key and value"
        + (f" — LOST or changed: {sorted(lost)[:10]}" if lost else ""),
    )
    not_applied = await applied.missing(acknowledged)
    verdict.check(
        not not_applied,
        "every acknowledged write is applied in the read model"
        + (f" — missing: {sorted(not_applied)[:10]}" if not_applied else ""),
    )
    verdict.check(
        not found,
        "read model == pure function of the write DB (DESIGN §4.2)"
        + (f" — {len(found)} differences: {found[:3]}" if found else ""),
    )
    async with stack.read_engine.connect() as conn:
        write_counts = int(
            await conn.scalar(text("SELECT coalesce(sum(write_count), 0) FROM records")) or 0
        )
        ledger = await applied_count(await driver_of(conn), Records)
    verdict.check(
        write_counts == commands == ledger,
        f"no duplicate counts: sum(write_count) {write_counts} = commands {commands}"
        f" = applied {ledger}",
    )
    dead = await _dead_letters(cluster)
    ours = [d for d in dead if d.get(b"note") == POISON["note"].encode()]
    verdict.check(
        len(dead) == len(ours) == expected_dead,
        f"dead-letter stream holds exactly the {expected_dead} poison event(s) injected since"
        f" the last Redis wipe (found {len(dead)}, {len(ours)} of them ours)",
    )
    try:
        pending = (
            await stack.redis.xpending(
                cluster.settings.event_stream_name, cluster.settings.consumer_group
            )
        )["pending"]
    except Exception as exc:
        pending = f"unknown ({exc})"
    verdict.check(pending == 0, f"no entries left pending in the consumer group ({pending})")
    verdict.check(
        not tally.server_errors,
        "no 5xx but 503 and no wrong answer"
        + (
            f" — {len(tally.server_errors)}: {tally.server_errors[:3]}"
            if tally.server_errors
            else ""
        ),
    )
    dead_processes = [
        p.role
        for p in (cluster.write_api, cluster.read_api, *cluster.projectors.values())
        if p is not None and p.process.poll() is not None
    ]
    verdict.check(not dead_processes, f"no process died unexpectedly {dead_processes or ''}")
    failed = [f"{f.kind}: {f.failure}" for f in faults if f.failure]
    verdict.check(
        not failed, "every fault's own expectation held" + (f" — {failed}" if failed else "")
    )
    return verdict


def _fault_line(result: FaultResult) -> str:
    converged = (
        f"caught up in {result.converged_after:5.1f}s"
        if result.converged_after is not None
        else f"NOT caught up in {CONVERGE_WITHIN:.0f}s"
    )
    mark = "✗" if result.failure else " "
    return f"  {mark} t+{result.at:5.0f}s  {result.kind:<26} {converged}  {result.note}" + (
        f"  — {result.failure}" if result.failure else ""
    )


def render(
    seconds: float, tally: Tally, faults: list[FaultResult], verdict: Verdict, elapsed: float
) -> str:
    """The one-screen report."""
    failures = ", ".join(f"{k} {v}" for k, v in tally.write_failures.most_common()) or "none"
    reads = ", ".join(f"{k} {v}" for k, v in tally.reads.most_common()) or "none"
    kinds = Counter(f.kind for f in faults)
    times = [f.converged_after for f in faults if f.converged_after is not None]
    lines = [
        f"cqrs-stack chaos soak: {seconds:.0f}s of load ({elapsed:.0f}s in all), write-api,"
        f" read-api, 2 projector replicas, 2 PostgreSQL servers, Redis",
        "",
        f"writes   acknowledged {len(tally.acknowledged)} (of them queued while Redis was down:"
        f" {tally.queued}); not acknowledged {tally.writes_failed} ({failures})",
        f"reads    {sum(tally.reads.values())} ({reads});"
        f" read-your-writes waits that ran out: {tally.read_your_writes_missed}",
        "faults   " + ", ".join(f"{kind} x{n}" for kind, n in kinds.items()),
        f"         time to catch up after a fault: max {max(times, default=0):.1f}s,"
        f" mean {sum(times) / max(len(times), 1):.1f}s",
    ]
    lines += [_fault_line(f) for f in faults]
    final = (
        f"{verdict.final_convergence:.1f}s after the load stopped"
        if verdict.final_convergence is not None
        else f"NOT within {FINAL_WITHIN:.0f}s"
    )
    lines += ["", f"converged {final}", "invariants"]
    lines += [f"  {'✓' if held else '✗'} {line}" for held, line in verdict.lines]
    lines += ["", f"result   {'PASS' if verdict.ok else 'FAIL'}"]
    return "\n".join(lines)


async def soak(seconds: float, report: Path | None, keep: bool) -> int:
    """Run the whole soak; return the exit status."""
    began = time.monotonic()
    cluster = await start_cluster(projectors=2)
    ok = False
    try:
        load = Load(
            cluster.write_api.url,  # type: ignore[union-attr]
            cluster.read_api.url,  # type: ignore[union-attr]
            WRITES_PER_SECOND,
            READS_PER_SECOND,
        )
        applied = Applied(cluster)
        traffic = asyncio.create_task(load.run())
        started = time.monotonic()
        print(f"soak: {seconds:.0f}s, data and logs in {cluster.root}", flush=True)
        faults, expected_dead = await run_faults(cluster, load, applied, seconds, started)
        remaining = started + seconds - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
        load.stop.set()
        await traffic
        verdict = await final_checks(cluster, load.tally, applied, expected_dead, faults)
        text_report = render(seconds, load.tally, faults, verdict, time.monotonic() - began)
        print("\n" + text_report, flush=True)
        if report is not None:
            report.write_text(text_report + "\n")  # noqa: ASYNC240
        ok = verdict.ok
    finally:
        await stop_cluster(cluster, keep=keep or not ok)
        if not ok:
            print(f"soak: data and process logs kept in {cluster.root}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m tests.soak [--seconds N] [--report FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "300"))
    )
    parser.add_argument("--report", type=Path, help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep data and logs after a pass")
    args = parser.parse_args(argv)
    if args.seconds < 10:
        parser.error("--seconds must be at least 10")
    hard_limit = args.seconds + 900  # setup, outages, catching up: never run unbounded
    return asyncio.run(asyncio.wait_for(soak(args.seconds, args.report, args.keep), hard_limit))

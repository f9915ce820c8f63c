"""This machine's own ceilings, measured in the same run: pgbench and redis-benchmark.

- pgbench, one single-row INSERT per transaction, 16 clients (the write path's reference);
- pgbench, a point SELECT by primary key, 16 clients, prepared (the read path's reference);
- redis-benchmark XADD, 16 clients, no pipelining (the stream's reference).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cqrs_stack.localservers import PostgresServer, RedisServer

_INSERT = (
    "\\set k random(1, 1000000000)\n"
    "INSERT INTO bench_ref_insert (k, v) VALUES (:k, repeat('x', 64));\n"
)
_SELECT = "\\set k random(1, 10000)\nSELECT v FROM bench_ref_select WHERE k = :k;\n"


def _pgbench(
    server: PostgresServer, database: str, script: str, clients: int, seconds: int, prepared: bool
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    try:
        done = subprocess.run(
            [
                str(server.bin_dir / "pgbench"),
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                "postgres",
                "-n",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-M",
                "prepared" if prepared else "simple",
                "-f",
                handle.name,
                database,
            ],
            env={**os.environ, "PGPASSWORD": server.password},
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
    finally:
        Path(handle.name).unlink(missing_ok=True)
    tps = float(re.search(r"tps = ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    latency = re.search(r"latency average = ([\d.]+) ms", done.stdout)
    return {
        "rate": tps,
        "latency_avg_ms": float(latency.group(1)) if latency else 0.0,
        "clients": clients,
        "seconds": seconds,
    }


def pgbench_insert(server: PostgresServer, database: str, seconds: int) -> dict[str, float]:
    """Single-row INSERT per transaction at c=16 (autocommit: one commit, one fsync each)."""
    server.psql(
        "DROP TABLE IF EXISTS bench_ref_insert;"
        " CREATE TABLE bench_ref_insert (id bigserial PRIMARY KEY, k bigint, v text,"
        " created_at timestamptz DEFAULT clock_timestamp());"
        " CREATE INDEX ON bench_ref_insert (k)",
        database,
    )
    try:
        return _pgbench(server, database, _INSERT, 16, seconds, prepared=False)
    finally:
        server.psql("DROP TABLE IF EXISTS bench_ref_insert", database)


def pgbench_select(server: PostgresServer, database: str, seconds: int) -> dict[str, float]:
    """Point SELECT by primary key on a 10,000-row table at c=16, prepared statements."""
    server.psql(
        "DROP TABLE IF EXISTS bench_ref_select;"
        " CREATE TABLE bench_ref_select (k bigint PRIMARY KEY, v text);"
        " INSERT INTO bench_ref_select SELECT g, repeat('x', 64) FROM generate_series(1, 10000) g;"
        " ANALYZE bench_ref_select",
        database,
    )
    try:
        return _pgbench(server, database, _SELECT, 16, seconds, prepared=True)
    finally:
        server.psql("DROP TABLE IF EXISTS bench_ref_select", database)


def redis_benchmark_binary() -> str | None:
    """redis-benchmark from Debian's redis-tools, if installed."""
    return shutil.which("redis-benchmark")


def redis_xadd(server: RedisServer, requests: int) -> dict[str, float] | None:
    """redis-benchmark XADD at c=16 with no pipelining; None when redis-benchmark is missing."""
    binary = redis_benchmark_binary()
    if binary is None:
        return None
    done = subprocess.run(
        [
            binary,
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-c",
            "16",
            "-n",
            str(requests),
            "--csv",
            "XADD",
            "bench-ref",
            "MAXLEN",
            "~",
            "100000",
            "*",
            "value",
            "x" * 64,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [line for line in done.stdout.strip().splitlines() if line]
    header = [h.strip('"') for h in lines[0].split(",")]
    values = [v.strip('"') for v in lines[-1].split(",")]
    row = dict(zip(header, values, strict=False))
    result: dict[str, float] = {"rate": float(row.get("rps", values[1])), "clients": 16}
    for name in ("p50_latency_ms", "p99_latency_ms", "avg_latency_ms"):
        if name in row:
            result[name] = float(row[name])
    return result

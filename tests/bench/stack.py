"""The stack under benchmark: two PostgreSQL servers, Redis, the API and the projector.

The servers keep fsync and ``synchronous_commit`` on and Redis its append-only file: the
product promises durability, so the benchmark measures it with durability on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from cqrs_stack.localservers import PostgresServer, RedisServer, ServerError, free_port

WRITE_DB, READ_DB = "bench_write", "bench_read"


@dataclass
class Service:
    """One ``cqrs-stack`` process (api or projector) started by the benchmark."""

    role: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """Base URL of the process's HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until /ready answers 200, or fail with the end of the process's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.role} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ServerError(f"{self.role} not ready after {timeout}s")

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections but does nothing."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (drain), then kill if it does not exit in 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class BenchStack:
    """Servers and processes of one benchmark run, all on 127.0.0.1 free ports."""

    root: Path
    write_pg: PostgresServer
    read_pg: PostgresServer
    redis: RedisServer
    env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path) -> BenchStack:
        """Start fresh durable servers under ``root`` and create and migrate the databases."""
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        root.chmod(0o755)
        write_pg = PostgresServer(root / "pg-write", free_port(), password="bench-write")
        read_pg = PostgresServer(root / "pg-read", free_port(), password="bench-read")
        redis = RedisServer(root / "redis", free_port())
        stack = cls(root, write_pg, read_pg, redis)
        for server in (write_pg, read_pg, redis):
            server.start()
        write_pg.create_database(WRITE_DB)
        read_pg.create_database(READ_DB)
        stack.env = {
            "WRITE_DB_URL": write_pg.url(WRITE_DB),
            "READ_DB_URL": read_pg.url(READ_DB),
            "REDIS_URL": redis.url,
            "EVENT_STREAM_NAME": "bench-events",
            "LOG_LEVEL": "warning",
        }
        stack.cli("migrate")
        return stack

    def cli(self, *args: str, timeout: float = 600) -> float:
        """Run ``cqrs-stack ARGS`` to completion; return its wall time in seconds."""
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cqrs_stack.cli", *args],
            env={**os.environ, **self.env},
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - started

    def launch(self, role: str) -> Service:
        """Start ``cqrs-stack ROLE`` (one uvicorn worker) and wait until it is ready."""
        port = free_port()
        log_path = self.root / f"{role}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cqrs_stack.cli", role, "--port", str(port)],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        service = Service(role, port, process, log_path)
        self.services[role] = service
        service.wait_ready()
        return service

    def server_pids(self) -> dict[str, int]:
        """Process ids of everything measured: services and servers."""
        pids = {role: s.process.pid for role, s in self.services.items()}
        for name, server in (("write-pg", self.write_pg), ("read-pg", self.read_pg)):
            if server.process is not None:
                pids[name] = server.process.pid
        if self.redis.process is not None:
            pids["redis"] = self.redis.process.pid
        pids["load-generator"] = os.getpid()
        return pids

    def stop(self) -> None:
        """Stop the services, then the servers, and remove the data."""
        for service in self.services.values():
            service.stop()
        for server in (self.redis, self.read_pg, self.write_pg):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                print(f"bench: stopping a server failed: {exc}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


class ProcessMonitor:
    """Samples CPU time and resident memory of named processes (with their children).

    ``mark(phase)`` closes a phase: CPU used by each process since the previous mark, as a share
    of one core. Peak RSS is sampled every ``interval`` seconds in a thread, bounded by the run.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval = interval
        self.peak_rss_mb: dict[str, float] = dict.fromkeys(pids, 0.0)
        # Peak RSS of each process within each phase (between two marks).
        self.phase_rss_mb: dict[str, dict[str, float]] = {}
        self._phase_peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.cpu: dict[str, dict[str, float]] = {}
        self._last_cpu = self._cpu_now()
        self._last_at = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        """Start sampling memory."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (bounded wait)."""
        self._stop.set()
        self._thread.join(5)

    def _family(self, name: str) -> list[psutil.Process]:
        proc = self._procs[name]
        if name in ("write-pg", "read-pg"):
            try:
                return [proc, *proc.children(recursive=True)]
            except psutil.Error:
                return [proc]
        return [proc]

    def _cpu_now(self) -> dict[str, float]:
        totals = {}
        for name in self._procs:
            total = 0.0
            for proc in self._family(name):
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            totals[name] = total
        return totals

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            for name, proc in self._procs.items():
                if name in ("write-pg", "read-pg"):
                    continue  # shared buffers are counted in every backend: not meaningful
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.peak_rss_mb[name] = max(self.peak_rss_mb[name], rss)
                self._phase_peak[name] = max(self._phase_peak[name], rss)

    def mark(self, phase: str) -> dict[str, float]:
        """Record CPU use per process (share of one core) since the previous mark; return the
        CPU seconds each used in that time."""
        now_cpu, now = self._cpu_now(), time.perf_counter()
        used = {name: now_cpu[name] - self._last_cpu.get(name, 0.0) for name in now_cpu}
        wall = max(now - self._last_at, 1e-9)
        self.cpu[phase] = {
            name: round((now_cpu[name] - self._last_cpu.get(name, 0.0)) / wall, 3)
            for name in now_cpu
        }
        self._last_cpu, self._last_at = now_cpu, now
        self.phase_rss_mb[phase] = {
            name: round(rss, 1)
            for name, rss in self._phase_peak.items()
            if name not in ("write-pg", "read-pg")
        }
        self._phase_peak = dict.fromkeys(self._phase_peak, 0.0)
        return used

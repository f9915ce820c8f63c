"""``cqrs-stack dev``: the whole stack on this machine in one command.

Starts what is not configured (PostgreSQL write and read servers on 5447/5448 and Redis on
6384, the original ports), migrates, then runs the write API, read API, projector and the
combined API on 8007 as child processes. Ctrl-C stops everything; data stays in --data-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .cli import DEFAULT_PORTS
from .localservers import PostgresServer, RedisServer, ServerError

DEV_USER = "cqrs"
DEV_PASSWORD = "cqrs"  # loopback-only development servers; never used by deployments


def _start_postgres(
    data_dir: Path, name: str, port: int, database: str
) -> tuple[PostgresServer, str]:
    server = PostgresServer(data_dir / name, port, password="postgres-dev")
    server.start()
    if not server.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DEV_USER}'").strip():
        server.psql(f"CREATE ROLE {DEV_USER} LOGIN PASSWORD '{DEV_PASSWORD}'")
    if not server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'").strip():
        server.psql(f"CREATE DATABASE {database} OWNER {DEV_USER}")
    return server, f"postgresql://{DEV_USER}:{DEV_PASSWORD}@127.0.0.1:{port}/{database}"


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{url} exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise ServerError(f"{url} not ready after {timeout}s")


def run_dev_stack(args: argparse.Namespace) -> int:
    """Run the local stack until Ctrl-C or SIGTERM; return the exit code."""
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    servers: list[PostgresServer | RedisServer] = []
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    env = dict(os.environ)
    try:
        if "WRITE_DB_URL" not in os.environ:
            server, env["WRITE_DB_URL"] = _start_postgres(data_dir, "write-db", 5447, "cqrs_write")
            servers.append(server)
        if "READ_DB_URL" not in os.environ:
            server, env["READ_DB_URL"] = _start_postgres(data_dir, "read-db", 5448, "cqrs_read")
            servers.append(server)
        if "REDIS_URL" not in os.environ:
            redis = RedisServer(data_dir / "redis", 6384)
            redis.start()
            servers.append(redis)
            env["REDIS_URL"] = redis.url
        cli = [sys.executable, "-m", "cqrs_stack.cli"]
        subprocess.run([*cli, "migrate"], env=env, check=True)
        for role in ("write-api", "read-api", "projector", "api"):
            port = DEFAULT_PORTS[role]
            child = subprocess.Popen(
                [*cli, role, "--host", args.host, "--port", str(port)], env=env
            )
            children.append(child)
            _wait_ready(f"http://127.0.0.1:{port}", child)
        print(_banner(data_dir), flush=True)
        while not stop.is_set():
            if any(child.poll() is not None for child in children):
                print("a process of the stack exited; stopping", file=sys.stderr)
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    except (ServerError, subprocess.CalledProcessError) as exc:
        print(f"cqrs-stack dev: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop_all(children, servers)
    return 0


def _stop_all(
    children: list[subprocess.Popen[bytes]], servers: list[PostgresServer | RedisServer]
) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(35)
        except subprocess.TimeoutExpired:
            child.kill()
    for server in reversed(servers):
        server.stop()
    print("cqrs-stack dev: stopped", file=sys.stderr)


def _banner(data_dir: Path) -> str:
    ports = DEFAULT_PORTS
    return (
        "\ncqrs-stack is running (Ctrl-C stops it)\n"
        f"  API (write + read)  http://127.0.0.1:{ports['api']}\n"
        f"  write API           http://127.0.0.1:{ports['write-api']}\n"
        f"  read API            http://127.0.0.1:{ports['read-api']}\n"
        f"  projector           http://127.0.0.1:{ports['projector']}/stats\n"
        f"  data                {data_dir}\n\n"
        f"  curl -s -XPOST localhost:{ports['api']}/write -H 'content-type: application/json'"
        ' -d \'{"key":"hello","value":"world"}\'\n'
        f"  curl -s localhost:{ports['api']}/read/hello\n"
    )

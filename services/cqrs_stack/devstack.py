"""``cqrs-stack dev``: the whole stack on this machine in one command.

Starts what is not configured (PostgreSQL write and read servers on 5447/5448 and Redis on
6384, the original ports, all moved by ``--port-offset``), migrates, then runs the write API,
read API, projector and the combined API on 8007 as child processes. Ctrl-C or SIGTERM stops
everything and exits 0; a child that exits on its own stops the stack and exits non-zero,
naming it. Data stays in --data-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .cli import (
    DEFAULT_PORTS,
    EXIT_CRASHED,
    EXIT_LOCAL_SERVER,
    EXIT_PORT_IN_USE,
    CommandError,
    port_in_use,
    reason_of,
    where,
)
from .localservers import PostgresServer, RedisServer, ServerError

DEV_USER = "cqrs"
DEV_PASSWORD = "cqrs"  # loopback-only development servers; never used by deployments
# The original service's ports of the servers the dev stack starts itself.
SERVER_PORTS = {"write DB": 5447, "read DB": 5448, "Redis": 6384}
ROLES_IN_START_ORDER = ("write-api", "read-api", "projector", "api")


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while the stack was starting."""


@dataclass
class Child:
    """One ``cqrs-stack ROLE`` process of the dev stack."""

    role: str
    port: int
    process: subprocess.Popen[bytes]


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


def _readiness(url: str) -> dict[str, str] | None:
    """The /ready checks of a process (200 or 503), or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=1) as answer:
            checks: dict[str, str] = json.load(answer).get("checks", {})
            return checks
    except urllib.error.HTTPError as refused:  # 503: not ready, with the failing checks
        with contextlib.suppress(ValueError):
            checks = json.load(refused).get("checks", {})
            return checks
        return {}
    except (OSError, ValueError):
        return None


def _wait_ready(child: Child, stop: threading.Event, tolerated: set[str], timeout: float) -> None:
    """Wait until ``child`` is ready, counting the checks in ``tolerated`` as passed."""
    url = f"http://127.0.0.1:{child.port}"
    deadline = time.monotonic() + timeout
    checks: dict[str, str] | None = None
    while time.monotonic() < deadline:
        if stop.is_set():
            raise Stopped
        if child.process.poll() is not None:
            raise CommandError(
                f"{child.role} exited with {child.process.returncode} before it was ready",
                EXIT_CRASHED,
            )
        checks = _readiness(url)
        if checks and all(v == "ok" for k, v in checks.items() if k not in tolerated):
            return
        stop.wait(0.2)
    raise CommandError(f"{child.role} on {url} not ready after {timeout}s: {checks}", EXIT_CRASHED)


def _redis_problem(url: str) -> str | None:
    """Why Redis at ``url`` cannot be used right now, or None when it answers PING."""
    from redis import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        return reason_of(exc)
    finally:
        client.close()
    return None


def _check_ports(host: str, offset: int, servers: list[str]) -> None:
    """Refuse to start when a port is taken, saying how to move the whole stack."""
    wanted = {f"the {role}": port + offset for role, port in DEFAULT_PORTS.items()}
    wanted |= {f"the {name}": SERVER_PORTS[name] + offset for name in servers}
    busy = [f"{port} ({what})" for what, port in wanted.items() if port_in_use(host, port)]
    if busy:
        raise CommandError(
            f"port {', '.join(busy)} is in use: stop what listens there, or move the whole "
            "stack, e.g. `cqrs-stack dev --port-offset 100` "
            "(make run RUN_ARGS='--port-offset 100')",
            EXIT_PORT_IN_USE,
        )


def run_dev_stack(args: argparse.Namespace, offset: int) -> int:
    """Run the local stack until Ctrl-C or SIGTERM; return the exit code."""
    data_dir = Path(args.data_dir).resolve()
    configured = {name: name in os.environ for name in ("WRITE_DB_URL", "READ_DB_URL", "REDIS_URL")}
    own_servers = [
        name
        for name, variable in zip(SERVER_PORTS, configured, strict=True)
        if not configured[variable]
    ]
    _check_ports(args.host, offset, own_servers)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # The children run in their own sessions, so a terminal's Ctrl-C reaches only this
    # process, which then stops them in order (a signal to all at once looked like a crash).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    servers: list[PostgresServer | RedisServer] = []
    children: list[Child] = []
    try:
        env = _start_servers(data_dir, offset, configured, servers)
        _migrate(env, stop)
        redis_problem = _redis_problem(env["REDIS_URL"])
        for role in ROLES_IN_START_ORDER:
            port = DEFAULT_PORTS[role] + offset
            process = subprocess.Popen(
                [*_CLI, role, "--host", args.host, "--port", str(port)],
                env=env,
                start_new_session=True,
            )
            children.append(Child(role, port, process))
            # Writes queue without Redis (the write API stays ready, by design); the projector
            # reports Redis and its stream consumer failing (its sweep still projects): the
            # banner says so instead of waiting on them.
            without_redis = {"redis", "stream-consumer"} if redis_problem else set()
            _wait_ready(children[-1], stop, without_redis, 60)
        print(_banner(data_dir, offset, env["REDIS_URL"], redis_problem), flush=True)
        return _watch(children, servers, stop)
    except Stopped:
        return 0
    except ServerError as exc:
        raise CommandError(str(exc), EXIT_LOCAL_SERVER) from exc
    finally:
        _stop_all(children, servers)


_CLI = [sys.executable, "-m", "cqrs_stack.cli"]


def _start_servers(
    data_dir: Path,
    offset: int,
    configured: dict[str, bool],
    servers: list[PostgresServer | RedisServer],
) -> dict[str, str]:
    """Start the servers not configured; return the children's environment."""
    env = dict(os.environ)
    # Start-up shows only the banner and what goes wrong: the children's info lines
    # (uvicorn's four per process) are for LOG_LEVEL=info.
    env.setdefault("LOG_LEVEL", "warning")
    if not configured["WRITE_DB_URL"] or not configured["READ_DB_URL"]:
        data_dir.mkdir(parents=True, exist_ok=True)
    if not configured["WRITE_DB_URL"]:
        port = SERVER_PORTS["write DB"] + offset
        server, env["WRITE_DB_URL"] = _start_postgres(data_dir, "write-db", port, "cqrs_write")
        servers.append(server)
    if not configured["READ_DB_URL"]:
        port = SERVER_PORTS["read DB"] + offset
        server, env["READ_DB_URL"] = _start_postgres(data_dir, "read-db", port, "cqrs_read")
        servers.append(server)
    if not configured["REDIS_URL"]:
        redis = RedisServer(data_dir / "redis", SERVER_PORTS["Redis"] + offset)
        redis.start()
        servers.append(redis)
        env["REDIS_URL"] = redis.url
    return env


def _migrate(env: dict[str, str], stop: threading.Event) -> None:
    """Run ``cqrs-stack migrate``; its own one-line error explains a failure."""
    done = subprocess.run([*_CLI, "migrate"], env=env, check=False, start_new_session=True)
    if done.returncode != 0:
        raise CommandError("`cqrs-stack migrate` failed (its message is above)", done.returncode)
    if stop.is_set():
        raise Stopped


def _watch(
    children: list[Child], servers: list[PostgresServer | RedisServer], stop: threading.Event
) -> int:
    """Wait for Ctrl-C/SIGTERM (0), or for a child or a server of the stack's own to exit on
    its own (EXIT_CRASHED, naming it)."""
    while not stop.wait(0.5):
        for child in children:
            code = child.process.poll()
            if code is not None:
                return _crashed(f"{child.role} (pid {child.process.pid}, port {child.port})", code)
        for server in servers:
            code = server.process.poll() if server.process is not None else None
            if code is not None and server.process is not None:
                name = "Redis" if isinstance(server, RedisServer) else "PostgreSQL"
                return _crashed(f"{name} (pid {server.process.pid}, port {server.port})", code)
    return 0


def _crashed(what: str, code: int) -> int:
    how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
    print(f"cqrs-stack dev: {what} {how}; stopping the stack", file=sys.stderr)
    return EXIT_CRASHED


def _stop_all(children: list[Child], servers: list[PostgresServer | RedisServer]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(35)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(10)
    for server in reversed(servers):
        server.stop()
    print("cqrs-stack dev: stopped", file=sys.stderr, flush=True)


def _banner(data_dir: Path, offset: int, redis_url: str, redis_problem: str | None) -> str:
    ports = {role: port + offset for role, port in DEFAULT_PORTS.items()}
    redis = f"  Redis               {where(redis_url)}\n"
    if redis_problem:
        redis = (
            f"  Redis               UNREACHABLE at {where(redis_url)} (REDIS_URL): "
            f"{redis_problem}\n"
            "                      writes are stored and queued (the write API stays ready);\n"
            "                      the projector is not ready: only its sweep of the write DB\n"
            "                      (every PROJECTOR_CATCHUP_INTERVAL) updates the read model\n"
        )
    return (
        "\ncqrs-stack is running (Ctrl-C stops it)\n"
        f"  API (write + read)  http://127.0.0.1:{ports['api']}  (docs: /docs)\n"
        f"  write API           http://127.0.0.1:{ports['write-api']}\n"
        f"  read API            http://127.0.0.1:{ports['read-api']}\n"
        f"  projector           http://127.0.0.1:{ports['projector']}/stats\n"
        f"{redis}"
        f"  data                {data_dir}\n\n"
        f"  curl -s -XPOST localhost:{ports['api']}/write -H 'content-type: application/json'"
        ' -d \'{"key":"hello","value":"world"}\'\n'
        f"  curl -s 'localhost:{ports['api']}/read/hello?position=1'"
        "   # position: what the write answered (1 on a new stack)\n"
    )

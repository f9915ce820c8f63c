"""The ``cqrs-stack`` command: servers, migrations, rebuild, status and the local dev stack."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit


class _RebuildStop:
    """SIGTERM (a Job deleted, a pod evicted) or SIGINT (Ctrl-C) of a ``rebuild`` process
    from its first moment: before the run's task exists, exit 130 at once (nothing started);
    while it runs, the task is cancelled once (a cancel until its swap commits; a repeated
    signal changes nothing, so a second Ctrl-C cannot cut the record of a committed swap
    short); once it is over, ignored (its outcome stands). A Python-level handler, installed
    before the slow imports, so no moment of the process is left to the default action (exit
    143) or to asyncio's own SIGINT handler (whose second Ctrl-C raises KeyboardInterrupt
    wherever the run is). A stopped run that has not ended ``_STOP_WITHIN`` seconds later
    (a read DB that stopped answering) exits 1 saying so: a Job's pod is killed 30 s after its
    SIGTERM, and a hung process must not outlive its grace period silently."""

    task: asyncio.Task[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    over = False
    stopped = False
    phase = ""  # the run's phase as last recorded

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        if cls.over:
            return
        if cls.task is None or cls.loop is None:
            os.write(2, b"rebuild cancelled before it started: nothing changed\n")
            os._exit(130)
        if cls.task.done() or cls.stopped:
            return
        cls.stopped = True
        with contextlib.suppress(RuntimeError):  # its loop closed: the run is over
            cls.loop.call_soon_threadsafe(cls.task.cancel)
        # A thread, not the loop: it fires even while the loop waits on a hung server.
        deadline = threading.Timer(_STOP_WITHIN, cls._give_up)
        deadline.daemon = True
        deadline.start()

    @classmethod
    def _give_up(cls) -> None:
        if cls.over:
            return
        if cls.phase in ("done", "rolled-back"):  # recorded as swapped: only clean-up was left
            os.write(
                2,
                b"swapped; the read DB stopped answering during the clean-up, left to the next"
                b" run\n",
            )
            os._exit(0)
        from .rebuild_progress import BEFORE_SWAP  # imported by the run already

        if cls.phase in BEFORE_SWAP:  # no swap begun: nothing of it is live
            os.write(
                2,
                b"rebuild cancelled, but a database did not answer within %d s (its sessions"
                b" end with this process); the live read model is unchanged\n" % _STOP_WITHIN,
            )
            os._exit(130)
        os.write(
            2,
            b"rebuild stopped, but the read DB did not answer within"
            b" %d s: whether its swap committed is not known (`cqrs-stack status` shows the"
            b" live version)\n" % _STOP_WITHIN,
        )
        os._exit(1)


# Seconds a stopped rebuild has to end (the cancel, or the swap's record and its answer).
_STOP_WITHIN = 20


def _cancel_early(argv: list[str]) -> None:
    """Install ``_RebuildStop`` for SIGTERM and SIGINT when this process is a ``rebuild``."""
    words = [arg for arg in argv if not arg.startswith("-")]
    if words[:1] == ["rebuild"]:
        with contextlib.suppress(ValueError):  # only the main thread takes signals
            for stop in (signal.SIGTERM, signal.SIGINT):
                signal.signal(stop, _RebuildStop.handle)


_cancel_early(sys.argv[1:])

# After _cancel_early on purpose: these imports are the slow part of the start.
from pydantic import ValidationError  # noqa: E402

from . import __version__  # noqa: E402
from .config import (  # noqa: E402
    MAX_PORT_OFFSET,
    Settings,
    describe_invalid,
    known_secrets,
    redact_text,
    redact_url,
)
from .resources import ROLES, Role  # noqa: E402

if TYPE_CHECKING:
    from .rebuild_progress import RunProgress

log = logging.getLogger("cqrs_stack")

DEFAULT_PORTS: dict[str, int] = {
    "api": 8007,
    "write-api": 8001,
    "read-api": 8002,
    "projector": 8003,
}


# Exit codes: each failure a script may want to tell apart has its own (README, Commands).
EXIT_DIFFERS = 1  # verify: the read model differs from the write DB
EXIT_CONFIG = 2  # invalid configuration or arguments
# 3 is a server that could not start (uvicorn's STARTUP_FAILURE).
EXIT_WRITE_DB = 4  # the write DB cannot be reached
EXIT_READ_DB = 5  # the read DB cannot be reached
EXIT_REDIS = 6  # Redis cannot be reached
EXIT_PORT_IN_USE = 7  # a port to listen on is taken
EXIT_LOCAL_SERVER = 8  # dev: a local PostgreSQL or Redis server could not start
EXIT_CRASHED = 9  # dev: a process of the stack exited on its own
EXIT_DEPENDENCY_LOST = 10  # a database or Redis failed in the middle of a command
EXIT_NOT_FOUND = 11  # dlq: no dead letter with that id
EXIT_REFUSED = 12  # dlq retry: the read DB still refuses it, or nothing to apply (drop it)
EXIT_INTERNAL = 70  # anything else (a bug, EX_SOFTWARE): --debug shows the traceback


class CommandError(Exception):
    """A failure the user can fix: one line on stderr and a distinct exit code, no traceback."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RedactingFilter(logging.Filter):
    """Hides URL passwords and the configured secrets in every record, traceback included."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message (and formatted traceback) without secrets."""
        record.msg = redact_text(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        return True


def configure_logging(level: str) -> None:
    """Structured key=value lines on stderr, never with a password in them.

    uvicorn runs without its own logging configuration (``log_config=None``), so its records
    reach these handlers too and pass the same filter.
    """
    logging.basicConfig(
        level=level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        stream=sys.stderr,
    )
    redacting = RedactingFilter(known_secrets())
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)


def port_in_use(host: str, port: int) -> bool:
    """Is ``port`` on ``host`` taken right now (bind refused with EADDRINUSE)?"""
    with socket.socket() as sock:
        # As the servers bind: connections left in TIME_WAIT by a process just stopped do not
        # count, only a socket that holds the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def where(url: str) -> str:
    """host:port of a URL, for messages (never its credentials)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 'default port'}"
    except ValueError:
        return redact_url(url)


def reason_of(exc: BaseException) -> str:
    """What went wrong, in a few words; the cause chain is searched for the driver's error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host name not found"
        if isinstance(seen, TimeoutError):
            return str(seen) or "timed out"  # a bounded wait says how long it waited
        seen = seen.__cause__ or getattr(seen, "orig", None)
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return redact_text(first[0] if first else type(exc).__name__, known_secrets())[:200]


def unreachable(what: str, variable: str, url: str, exc: BaseException) -> CommandError:
    """The one-line error for a dependency that cannot be reached, naming where it looked."""
    codes = {"WRITE_DB_URL": EXIT_WRITE_DB, "READ_DB_URL": EXIT_READ_DB, "REDIS_URL": EXIT_REDIS}
    server = "Redis" if variable == "REDIS_URL" else "PostgreSQL"
    if variable in os.environ:
        check = f"is {server} running there, and is {variable} right?"
    else:
        check = f"{variable} is not set, so this is the local dev stack: is `make run` going?"
    return CommandError(
        f"cannot reach the {what} at {where(url)} ({variable}): {reason_of(exc)}; {check}",
        codes[variable],
    )


def _serve(role: Role, args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .app import begin_stop, create_server_app
    from .errors import TracingUnavailable
    from .http_server import HeaderSectionProtocol
    from .supervision import exit_status, set_stop_hook

    if port_in_use(args.host, args.port):
        raise CommandError(
            f"port {args.port} on {args.host} is in use: stop what listens there, "
            f"or choose another with --port",
            EXIT_PORT_IN_USE,
        )

    log.info(
        "starting role=%s host=%s port=%d write_db=%s read_db=%s redis=%s",
        role,
        args.host,
        args.port,
        redact_url(settings.write_db_url),
        redact_url(settings.read_db_url),
        redact_url(settings.redis_url),
    )
    try:
        served = create_server_app(settings, role)
    except TracingUnavailable as exc:  # an OTEL_* setting TRACING=true cannot follow
        raise CommandError(f"TRACING: {exc}", EXIT_CONFIG) from None

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # The writes in hand are answered within SHUTDOWN_TIMEOUT, before the graceful
            # bound below (the same setting) would cancel their requests with a bare 500.
            begin_stop(served)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        served,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        http=HeaderSectionProtocol,  # trailers are no headers (http_server.py)
        access_log=args.access_log,
        log_config=None,  # our handlers (configure_logging), with the redacting filter
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout)),
        loop="uvloop" if _has_uvloop() else "asyncio",
    )
    server = Server(config)
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


async def _reachable(
    engine: Any, what: str, variable: str, url: str, bounded: bool = False
) -> None:
    """Connect once, so that an unreachable database is one clear error, not a traceback.
    ``bounded``: a server that accepts and does not answer within the diagnosis's
    READING_TIMEOUT is unreachable too (its connect timeout alone is longer)."""
    from sqlalchemy import text

    from .diagnosis import within

    async def check() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        await (within(check()) if bounded else check())
    except Exception as exc:  # any failure to connect is reported the same way
        raise unreachable(what, variable, url, exc) from exc


async def _with_engines(
    settings: Settings, work: Callable[[Any, Any], Awaitable[int]], bounded: bool = False
) -> int:
    from . import db

    write_engine = db.write_engine(settings, "cli")
    read_engine = db.read_engine(settings, "cli")
    try:
        await _reachable(write_engine, "write DB", "WRITE_DB_URL", settings.write_db_url, bounded)
        await _reachable(read_engine, "read DB", "READ_DB_URL", settings.read_db_url, bounded)
        return await work(write_engine, read_engine)
    finally:
        await write_engine.dispose()
        await read_engine.dispose()


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import expected_schema_versions, migrate, schema_version

    report: dict[str, Any] = {"version": __version__}

    async def work(write_engine: Any, read_engine: Any) -> int:
        applied = await migrate(write_engine, "write") + await migrate(read_engine, "read")
        print("\n".join(f"applied {name}" for name in applied) or "schema up to date")
        report["applied"] = len(applied)
        report["schemaVersions"] = {
            "write": await schema_version(write_engine),
            "read": await schema_version(read_engine),
        }
        report["expectedSchemaVersions"] = expected_schema_versions()
        return 0

    # The lines printed are the answer; the migrations' own log lines would repeat them.
    logging.getLogger("cqrs_stack.migrations").setLevel(logging.WARNING)

    code = asyncio.run(_with_engines(settings, work))
    if settings.migrate_report_file:
        # The migration Job's termination message: what the operator records in the status.
        with open(settings.migrate_report_file, "w") as out:
            json.dump(report, out, separators=(",", ":"))
    return code


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from .projections import by_name, enabled
    from .rebuild import RebuildError, rebuild, rollback

    names = settings.read_model_names
    if args.rollback and args.version is not None:
        raise CommandError(
            "--rollback swaps the kept previous version in: no --version", EXIT_CONFIG
        )
    if args.version is not None and not 1 <= args.version <= 2**31 - 1:
        raise CommandError(f"--version must be 1 to {2**31 - 1}, not {args.version}", EXIT_CONFIG)
    if args.model is not None:
        try:
            by_name(args.model)
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_CONFIG) from None
        if args.model not in names:
            raise CommandError(
                f"the read model {args.model!r} is not enabled"
                f" (READ_MODELS={settings.read_models})",
                EXIT_CONFIG,
            )
        names = (args.model,)
    models = enabled(names)
    bar = ProgressBar(sys.stderr)

    def shown(progress: Any) -> None:
        _RebuildStop.phase = progress.phase
        bar.show(progress)

    async def work(write_engine: Any, read_engine: Any) -> int:
        # SIGTERM (a Job deleted, a pod evicted) and SIGINT (Ctrl-C) cancel this task from
        # here on (_RebuildStop, installed at the start): recorded as cancelled, the live
        # version untouched, unless the swap committed. (Only the main thread takes signals.)
        _RebuildStop.task = asyncio.current_task()
        _RebuildStop.loop = asyncio.get_running_loop()
        try:
            if args.rollback:
                count = await rollback(
                    write_engine, read_engine, settings, shown, models, run_id=args.run_id
                )
            else:
                count = await rebuild(
                    write_engine,
                    read_engine,
                    settings,
                    shown,
                    models,
                    run_id=args.run_id,
                    version=args.version,
                )
        except asyncio.CancelledError:
            _RebuildStop.over = True
            bar.close()
            print("rebuild cancelled: the live read model is unchanged", file=sys.stderr)
            return 130
        except RebuildError as exc:
            _RebuildStop.over = True
            bar.close()
            print(f"rebuild failed: {exc}", file=sys.stderr)
            return 1
        _RebuildStop.over = True
        bar.close()
        if (
            _RebuildStop.stopped
        ):  # after the swap's commit a stop is no cancel: the clean-up was skipped
            print("swapped; cleanup of the old shadow left to the next run", file=sys.stderr)
        which = ", ".join(model.name for model in models)
        if args.rollback:
            print(f"previous version swapped back in, caught up by {count} commands ({which})")
        else:
            print(f"read model rebuilt from {count} commands ({which})")
        return 0

    return asyncio.run(_with_engines(settings, work))


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from . import diagnosis, stream
    from .figures import stack_figures
    from .projections import enabled
    from .read_db import model_figures, models_kept_elsewhere

    async def work(write_engine: Any, read_engine: Any) -> int:
        redis = stream.connect(settings)
        try:
            health = await diagnosis.diagnose(write_engine, read_engine, redis, settings)
            if health.read_db_error is not None:
                # The figures read the read DB too: say what the health found instead.
                print("\n".join(diagnosis.describe(health)))
                raise CommandError(f"read DB: {health.read_db_error}", EXIT_READ_DB)
            try:
                figures = await stack_figures(write_engine, read_engine, redis, settings, health)
            except TimeoutError as exc:  # a database stopped answering after the health
                print("\n".join(diagnosis.describe(health)))
                raise CommandError(f"figures: {exc}", EXIT_DEPENDENCY_LOST) from None
        finally:
            await redis.aclose()
        models = enabled(settings.read_model_names)
        figures["read_models"] = await diagnosis.within(
            model_figures(read_engine, models, settings.stats_exact_count_max)
        )
        # Swept by a replica whose READ_MODELS has them, absent from this READ_MODELS.
        figures["read_models_not_enabled_here"] = await diagnosis.within(
            models_kept_elsewhere(read_engine, models)
        )
        figures["rebuild"] = await diagnosis.within(_rebuild_figures(read_engine))
        if args.json:
            print(json.dumps({**figures, "health": health.as_dict()}, default=str, indent=2))
        else:
            width = max(len(k) for k in figures)
            for name, value in figures.items():
                print(f"{name:<{width}}  {value}")
            print("\n".join(diagnosis.describe(health)))
        if not figures["redis_available"]:
            print(
                f"cqrs-stack: Redis unreachable at {where(settings.redis_url)} (REDIS_URL): "
                "writes are stored and queued, the read model is not updated until it is back",
                file=sys.stderr,
            )
        return 0

    return asyncio.run(_with_engines(settings, work, bounded=True))


async def _rebuild_figures(read_engine: Any) -> dict[str, object]:
    from .db import driver_of
    from .rebuild_progress import rebuild_figures

    async with read_engine.connect() as session:
        return await rebuild_figures(await driver_of(session))


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from .projections import enabled
    from .verify import differences

    models = enabled(settings.read_model_names)

    async def work(write_engine: Any, read_engine: Any) -> int:
        found = await differences(write_engine, read_engine, models)
        for line in found[:50]:
            print(line)
        if found:
            print(f"read model differs from the write DB in {len(found)} ways", file=sys.stderr)
            return EXIT_DIFFERS
        print(f"read model matches the write DB ({', '.join(m.name for m in models)})")
        return 0

    return asyncio.run(_with_engines(settings, work))


def run_dlq(args: argparse.Namespace, settings: Settings) -> int:
    """``dlq list|retry|drop`` with ``settings`` (also run by ``kubectl cqrs dlq``)."""
    from .dead_letters import DeadLetterError, DeadLetterNotFound, InvalidRequest

    try:
        if args.dlq_command == "list":
            return asyncio.run(
                _with_redis(settings, lambda redis: _dlq_list(args, settings, redis))
            )
        return asyncio.run(_with_engines(settings, lambda w, r: _dlq_change(args, settings, w, r)))
    except DeadLetterNotFound as exc:
        raise CommandError(str(exc), EXIT_NOT_FOUND) from None
    except InvalidRequest as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from None
    except DeadLetterError as exc:
        raise CommandError(str(exc), EXIT_REFUSED) from None


async def _with_redis(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work`` with a Redis client, once Redis answered (else one clear error)."""
    from redis.exceptions import RedisError

    from . import stream

    redis = stream.connect(settings)
    try:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise unreachable("Redis", "REDIS_URL", settings.redis_url, exc) from exc
        return await work(redis)
    finally:
        await redis.aclose()


async def _dlq_list(args: argparse.Namespace, settings: Settings, redis: Any) -> int:
    from .dead_letters import age_text, list_page

    page = await list_page(redis, settings, args.limit, args.after)
    if args.json:
        body = {
            "dead_letters": [e.summary() for e in page.entries],
            "next_after": page.next_after,
            "total": page.total,
        }
        print(json.dumps(body, indent=2))
        return 0
    print(f"{'ID':<22} {'POSITION':>10} {'DELIVERIES':>10} {'AGE':>8}  {'KEY':<32} REASON")
    for e in page.entries:
        key = "-" if e.key is None else (e.key if len(e.key) <= 32 else e.key[:31] + "~")
        position = "-" if e.position is None else str(e.position)
        print(
            f"{e.entry_id:<22} {position:>10} {e.deliveries:>10} {age_text(e.age_seconds):>8}"
            f"  {key:<32} {e.reason[:80]}"
        )
    more = f"; next page: --after {page.next_after}" if page.next_after else ""
    print(f"{len(page.entries)} of {page.total} dead letters{more}")
    return 0


async def _dlq_change(
    args: argparse.Namespace, settings: Settings, write_engine: Any, read_engine: Any
) -> int:
    from . import dead_letters

    async def work(redis: Any) -> int:
        if args.dlq_command == "drop":
            if not args.by:
                raise CommandError("no OS user name here: say who drops it with --by", EXIT_CONFIG)
            letter = await dead_letters.drop(
                redis, read_engine, settings, args.id, args.reason, args.by
            )
            print(f"dropped {letter.entry_id} (position {letter.position}) by {args.by}")
            return 0
        if args.id is not None:
            outcome = await dead_letters.retry(redis, write_engine, read_engine, settings, args.id)
            print(f"{outcome.entry_id}: {outcome.result} (position {outcome.position})")
            return 0
        outcomes = await dead_letters.retry_all(redis, write_engine, read_engine, settings)
        kept = [o for o in outcomes if o.result in ("refused", "not retryable")]
        for outcome in kept[:50]:
            print(f"{outcome.entry_id}: {outcome.result}: {outcome.detail}", file=sys.stderr)
        print(
            f"retried {len(outcomes)} dead letters: {len(outcomes) - len(kept)} applied or"
            f" already applied, {len(kept)} left in the dead-letter stream"
        )
        return EXIT_REFUSED if kept else 0

    return await _with_redis(settings, work)


def add_dlq_commands(dlq: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    """The ``dlq`` subcommands and their arguments (``cqrs-stack dlq``, ``kubectl cqrs dlq``)."""
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters, oldest first", parents=parents)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument(
        "--limit",
        type=int,
        default=None,
        help="entries per page (default and at most DEAD_LETTER_PAGE_MAX)",
    )
    listing.add_argument("--after", default=None, metavar="ID", help="the page after this id")
    retry = actions.add_parser(
        "retry", help="apply again through the projection (exactly once)", parents=parents
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", default=None, help="the dead letter's id")
    which.add_argument("--all", action="store_true", help="every dead letter")
    drop = actions.add_parser(
        "drop", help="remove without applying, recorded in the read DB", parents=parents
    )
    drop.add_argument("id", help="the dead letter's id")
    drop.add_argument("--reason", required=True, help="why it is dropped (recorded)")
    drop.add_argument(
        "--by", default=_os_user(), help="who drops it (recorded; default: the OS user)"
    )


def _os_user() -> str | None:
    """The OS user's name, None where it has none (a container's uid without a passwd entry:
    then ``--by`` is needed)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from .devstack import run_dev_stack

    offset = settings.dev_port_offset if args.port_offset is None else args.port_offset
    if not 0 <= offset <= MAX_PORT_OFFSET:
        raise CommandError(f"--port-offset must be 0..{MAX_PORT_OFFSET}, not {offset}", EXIT_CONFIG)
    return run_dev_stack(args, offset)


class ProgressBar:
    """A one-line progress bar of a rebuild run for a terminal; one line per change otherwise.

    It shows what the run's progress record says (``rebuild_progress.RunProgress``): phase,
    percent, commands done of the total, rate and ETA.
    """

    def __init__(self, out: Any, width: int = 40) -> None:
        self.out = out
        self.width = width
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._last: tuple[str, int] | None = None

    def show(self, run: RunProgress) -> None:
        """Show the run as recorded."""
        percent = int(run.percent)
        if not self.tty and (run.phase, percent) == self._last:
            return
        self._last = (run.phase, percent)
        filled = self.width * percent // 100
        rate = "" if run.rate is None else f" {run.rate:,.0f}/s"
        eta = "" if run.eta_seconds is None or run.finished else f" ETA {run.eta_seconds:.0f}s"
        line = (
            f"{run.phase:<9} [{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%"
            f" {run.done}/{run.total}{rate}{eta}"
        )
        self.out.write(("\r" + line + "\x1b[K") if self.tty else (line + "\n"))
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
    # Accepted before or after the command; SUPPRESS keeps one from resetting the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure (also LOG_LEVEL=debug)",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    helps = {
        "api": "serve the write and read routes on one port (the original service's layout)",
        "write-api": "serve POST/PUT /write",
        "read-api": "serve GET /read/{key}",
        "projector": "project the stream into the read DB (serves /health, /ready, /metrics)",
    }
    for role in ROLES:
        server = command(role, helps[role])
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
    command("migrate", "create or upgrade both schemas (idempotent)").set_defaults(handler=_migrate)
    rebuild = command("rebuild", "rebuild the read models from the write DB")
    rebuild.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="rebuild only this read model (default: every one in READ_MODELS)",
    )
    rebuild.add_argument(
        "--run-id",
        default=None,
        metavar="ID",
        help="the id its progress is recorded under in rebuild_runs (default: a new one)",
    )
    rebuild.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="the version being built (default: the live version + 1)",
    )
    rebuild.add_argument(
        "--rollback",
        action="store_true",
        help="swap the kept previous version back in, caught up first"
        " (kept REBUILD_KEEP_PREVIOUS_SECONDS)",
    )
    rebuild.set_defaults(handler=_rebuild)
    status = command("status", "lag, counts, pending entries, dead letters")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)
    command(
        "verify", "check that every read model equals the projection of the write DB"
    ).set_defaults(handler=_verify)
    dlq = command("dlq", "list, retry or drop dead letters")
    add_dlq_commands(dlq, [common])
    dlq.set_defaults(handler=run_dlq)
    dev = command(
        "dev", "run the whole stack locally on embedded PostgreSQL and Redis (Ctrl-C stops)"
    )
    dev.add_argument("--data-dir", default=".data", help="where data survives restarts (.data)")
    dev.add_argument("--host", default="127.0.0.1", help="address the APIs bind (127.0.0.1)")
    dev.add_argument(
        "--port-offset",
        type=int,
        default=None,
        metavar="N",
        help="add N to every port of the stack, e.g. 100: API 8107, write DB 5547 "
        "(default DEV_PORT_OFFSET, 0)",
    )
    dev.set_defaults(handler=_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cqrs-stack`` console script.

    A failure the user can fix is one line and its exit code; ``--debug`` (or
    ``LOG_LEVEL=debug``) adds the traceback. Nothing printed carries a password.
    """
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("LOG_LEVEL", "").lower() == "debug"
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"cqrs-stack: invalid configuration:\n{describe_invalid(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    try:
        return int(args.handler(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the edge: every error becomes one line and an exit code
        code, message = _describe_failure(exc)
        if debug:
            print(redact_text(traceback.format_exc(), known_secrets()), file=sys.stderr, end="")
        traced = exc.__cause__ is not None or not isinstance(exc, CommandError)
        hint = " (--debug shows the traceback)" if traced and not debug else ""
        print(f"cqrs-stack {args.command}: {message.strip()}{hint}", file=sys.stderr)
        return code


def _describe_failure(exc: Exception) -> tuple[int, str]:
    """The exit code and the one-line message of a command's failure."""
    from redis.exceptions import RedisError
    from sqlalchemy.exc import DBAPIError

    from .db import session_ended

    if isinstance(exc, CommandError):
        return exc.exit_code, str(exc)
    # A session cut on a driver connection (a rebuild's, a verify's) is the same loss.
    if isinstance(exc, DBAPIError | RedisError | OSError) or session_ended(exc):
        return EXIT_DEPENDENCY_LOST, f"a database or Redis failed: {reason_of(exc)}"
    detail = redact_text(f"{type(exc).__name__}: {exc}", known_secrets())
    return EXIT_INTERNAL, f"unexpected error: {detail}"


if __name__ == "__main__":
    # Run as `python -m cqrs_stack.cli` (the dev stack's children): use the module itself, so
    # that its error classes are the ones other modules import, not a copy named __main__.
    from cqrs_stack import cli

    sys.exit(cli.main())

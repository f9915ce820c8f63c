"""The first five minutes: configuration errors, unreachable servers and the dev stack.

Every entry point is run as a real process; the dev stack is started, stopped with the
signals a terminal and a supervisor send, and crashed, against the real servers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

import cqrs_stack.migrations
from cqrs_operator.spec import SpecError, parse_spec
from cqrs_stack.cli import (
    EXIT_CONFIG,
    EXIT_CRASHED,
    EXIT_PORT_IN_USE,
    EXIT_READ_DB,
    EXIT_WRITE_DB,
    port_in_use,
)
from cqrs_stack.localservers import free_port
from tests.fixtures.stack import Stack, wait_until

SECRET = "S3cretPW-9f2e"
TOKEN = "T0ken-secret-77"
COMMANDS = [
    ["api"],
    ["write-api"],
    ["read-api"],
    ["projector"],
    ["migrate"],
    ["status"],
    ["verify"],
    ["rebuild"],
    ["dlq", "list"],
    ["dev"],
]
# Invalid URLs that carry a password, one per way a URL can be refused.
INVALID_URLS = [
    {"WRITE_DB_URL": f"mysql://cqrs:{SECRET}@127.0.0.1:5447/cqrs_write"},
    {"READ_DB_URL": f"postgresql://cqrs:{SECRET}@127.0.0.1:notaport/cqrs_read"},
    {"REDIS_URL": f"http://:{SECRET}@127.0.0.1:6384"},
    {"REDIS_URL": f"redis://:{SECRET}@127.0.0.1:99999/0"},
    {"WRITE_DB_URL": f"postgres://cqrs:{SECRET}@[::1/cqrs_write"},
]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``cqrs-stack ARGS`` with exactly ``env`` (plus PATH); capture both streams."""
    return subprocess.run(
        [sys.executable, "-m", "cqrs_stack.cli", *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_refused_quietly(done: subprocess.CompletedProcess[str], *names: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_CONFIG, output
    assert all(name in done.stderr for name in names), output  # names each variable
    assert SECRET not in output and TOKEN not in output and "Traceback" not in output, output


def test_no_entry_point_prints_a_password_of_an_invalid_url() -> None:
    every_kind = {name: url for bad in INVALID_URLS[:3] for name, url in bad.items()}
    for command in COMMANDS:
        done = run_cli(*command, env={**every_kind, "WRITE_API_TOKEN": TOKEN})
        _assert_refused_quietly(done, *every_kind)


@pytest.mark.parametrize("bad", INVALID_URLS, ids=lambda bad: next(iter(bad)))
def test_no_kind_of_invalid_url_shows_its_password(bad: dict[str, str]) -> None:
    _assert_refused_quietly(run_cli("status", env=bad), *bad)


def test_operator_spec_errors_hide_the_redis_password() -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({"redis": {"url": f"http://:{SECRET}@redis:6379"}}, namespace="n", name="s")
    assert SECRET not in str(refused.value) and "spec.redis.url" in str(refused.value)


def _dead_url(database: str) -> str:
    return f"postgresql://cqrs:{SECRET}@127.0.0.1:{free_port()}/{database}"


@pytest.mark.parametrize("command", ["migrate", "status", "verify", "rebuild"])
def test_unreachable_database_is_one_line_with_its_own_exit_code(
    stack: Stack, command: str
) -> None:
    done = run_cli(command, env={**stack.env, "WRITE_DB_URL": _dead_url("w")})
    assert done.returncode == EXIT_WRITE_DB, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "WRITE_DB_URL" in lines[0] and "connection refused" in lines[0]
    assert "127.0.0.1:" in lines[0] and SECRET not in lines[0] and "--debug" in lines[0]


def test_each_dependency_has_its_exit_code_and_debug_shows_the_traceback(stack: Stack) -> None:
    read_down = run_cli("migrate", env={**stack.env, "READ_DB_URL": _dead_url("r")})
    assert read_down.returncode == EXIT_READ_DB and "READ_DB_URL" in read_down.stderr
    dead_write = {**stack.env, "WRITE_DB_URL": _dead_url("w")}
    for traced in (
        run_cli("status", "--debug", env=dead_write),
        run_cli("verify", env={**dead_write, "LOG_LEVEL": "debug"}),
    ):
        assert traced.returncode == EXIT_WRITE_DB
        assert "Traceback" in traced.stderr and SECRET not in traced.stdout + traced.stderr


def test_dev_with_a_dead_database_says_so_in_a_few_lines(stack: Stack, tmp_path: Path) -> None:
    offset = str(_free_offset())
    dead_write = {**stack.env, "WRITE_DB_URL": _dead_url("w")}
    done = run_cli("dev", "--port-offset", offset, "--data-dir", str(tmp_path), env=dead_write)
    assert done.returncode == EXIT_WRITE_DB, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert "cannot reach the write DB" in done.stderr


def test_unset_urls_name_the_local_dev_stack() -> None:
    # Nothing configured: the defaults are the local dev stack's ports (none running here).
    if port_in_use("127.0.0.1", 5447):
        pytest.skip("something listens on 5447 on this machine")
    done = run_cli("status")
    assert done.returncode == EXIT_WRITE_DB
    assert "make run" in done.stderr and "WRITE_DB_URL is not set" in done.stderr


async def test_a_server_with_its_database_down_never_shows_the_password(
    stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "read-api.log"
    env = {**os.environ, **stack.env, "READ_DB_URL": _dead_url("r"), "LOG_LEVEL": "debug"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cqrs_stack.cli", "read-api", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def not_ready() -> bool:
                try:
                    return (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 503
                except httpx.HTTPError:
                    return False

            await wait_until(not_ready, 30, "the read API to answer not ready")
            body = (await client.get(f"http://127.0.0.1:{port}/ready")).text
            read = await client.get(f"http://127.0.0.1:{port}/read/k")
        assert read.status_code == 503 and SECRET not in read.text
        assert "read_db" in body and SECRET not in body
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(40)
    assert SECRET not in log.read_text(errors="replace")


# --- the dev stack ------------------------------------------------------------------------


def _free_offset() -> int:
    """A port offset under which every port of the dev stack is free right now.

    Kept under the ephemeral range (32768 and up), where the fixtures' free ports and every
    outgoing connection's local port come from, so that a port found free stays free.
    """
    ports = (8001, 8002, 8003, 8007, 5447, 5448, 6384)
    seed = os.getpid() * 7919 + time.monotonic_ns() // 1000
    for attempt in range(50):
        offset = 1_000 + (seed + attempt * 997) % (32_000 - 8_007 - 1_000)
        if not any(port_in_use("127.0.0.1", port + offset) for port in ports):
            return offset
    pytest.fail("no free port offset found")


class DevStack:
    """``cqrs-stack dev`` as a real process in its own process group, as under a terminal."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        offset: int,
        *,
        inherit: bool = True,
        data_dir: Path | None = None,
    ) -> None:
        self.offset = offset
        self.out = workdir / f"dev-{offset}.out"
        self.err = workdir / f"dev-{offset}.err"
        data = str(data_dir or workdir / "data")
        command = ["dev", "--port-offset", str(offset), "--data-dir", data]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cqrs_stack.cli", *command],
                env={**os.environ, **env} if inherit else env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: a "terminal" Ctrl-C reaches it alone
            )

    def url(self, role_port: int) -> str:
        return f"http://127.0.0.1:{role_port + self.offset}"

    async def wait_running(self, timeout: float = 90) -> str:
        async def banner() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"dev exited {self.process.returncode}: {self.err.read_text()}")
            return "is running" in self.out.read_text()

        await wait_until(banner, timeout, "the dev stack's banner")
        return self.out.read_text()

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        self.process.wait(timeout)
        return self.process.returncode, self.err.read_text()

    def kill_all(self) -> None:
        if self.process.poll() is None:
            for child in self.children():
                child.kill()
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def dev_stacks(stack: Stack, tmp_path: Path) -> Iterator[list[DevStack]]:
    started: list[DevStack] = []
    yield started
    for dev in started:
        dev.kill_all()


async def _start_dev(
    stack: Stack, tmp_path: Path, started: list[DevStack], **env: str
) -> tuple[DevStack, str]:
    dev = DevStack({**stack.env, **env}, tmp_path, _free_offset())
    started.append(dev)
    return dev, await dev.wait_running()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
async def test_dev_stops_on_ctrl_c_or_sigterm_with_exit_0_and_one_line(
    stack: Stack, tmp_path: Path, dev_stacks: list[DevStack], how: str
) -> None:
    dev, banner = await _start_dev(stack, tmp_path, dev_stacks)
    assert f"127.0.0.1:{8007 + dev.offset}" in banner
    children = dev.children()
    assert len(children) == 4
    async with httpx.AsyncClient(timeout=10) as client:
        written = await client.post(dev.url(8007) + "/write", json={"key": "k", "value": "v"})
        position = written.json()["position"]
        read = await client.get(dev.url(8002) + f"/read/k?position={position}")
    assert read.json()["value"] == "v"
    if how == "ctrl-c":
        os.killpg(dev.process.pid, signal.SIGINT)  # what a terminal sends to its foreground
    else:
        dev.process.send_signal(signal.SIGTERM)
    code, err = dev.finish()
    assert code == 0, err
    assert err.strip().splitlines() == ["cqrs-stack dev: stopped"], err
    assert not any(child.is_running() for child in children)


async def test_dev_moves_its_own_servers_and_starts_quietly(
    tmp_path: Path, dev_stacks: list[DevStack], request: pytest.FixtureRequest
) -> None:
    # No *_URL: the newcomer's `make run`, with every port (servers too) moved by the offset.
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_URL") and k != "LOG_LEVEL"}
    clean.pop("XDG_RUNTIME_DIR", None)  # as in containers and CI: must not warn
    offset = _free_offset()
    # A private folder of mode 0700 owned by root, as /root is: the PostgreSQL servers run as
    # nobody and must still reach their data under it. (pytest's own tmp root is no place
    # for it: every pytest session that starts resets it to 0700.)
    home = Path(tempfile.mkdtemp(prefix="cqrs-dev-home-"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    dev = DevStack(clean, tmp_path, offset, inherit=False, data_dir=home / "data")
    dev_stacks.append(dev)
    banner = await dev.wait_running(120)
    for port in (5447, 5448, 6384):
        assert port_in_use("127.0.0.1", port + offset)
    assert dev.err.read_text() == ""  # start-up prints the banner and nothing else
    migrations = Path(cqrs_stack.migrations.__file__).parent
    assert [line for line in banner.splitlines() if line.startswith("applied")] == [
        f"applied {side}/{sql.stem}"
        for side in ("write", "read")
        for sql in sorted((migrations / side).glob("*.sql"))
    ]  # once each
    async with httpx.AsyncClient(timeout=10) as client:
        written = await client.post(dev.url(8007) + "/write", json={"key": "a", "value": "b"})
        read = await client.get(dev.url(8007) + f"/read/a?position={written.json()['position']}")
    assert read.json()["position_reached"] is True
    os.killpg(dev.process.pid, signal.SIGINT)
    code, err = dev.finish()
    assert (code, err.strip()) == (0, "cqrs-stack dev: stopped")
    assert not any(port_in_use("127.0.0.1", port + offset) for port in (5447, 5448, 6384))


async def test_dev_names_a_crashed_child_and_exits_non_zero(
    stack: Stack, tmp_path: Path, dev_stacks: list[DevStack]
) -> None:
    dev, _ = await _start_dev(stack, tmp_path, dev_stacks)
    victim = next(c for c in dev.children() if "write-api" in c.cmdline())
    victim.kill()
    code, err = dev.finish()
    assert code == EXIT_CRASHED, err
    assert f"write-api (pid {victim.pid}" in err and "killed by signal 9" in err


async def test_dev_names_a_dead_server_of_its_own_and_exits_non_zero(
    tmp_path: Path, dev_stacks: list[DevStack], request: pytest.FixtureRequest
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_URL") and k != "LOG_LEVEL"}
    offset = _free_offset()
    home = Path(tempfile.mkdtemp(prefix="cqrs-dev-home-"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    dev = DevStack(clean, tmp_path, offset, inherit=False, data_dir=home / "data")
    dev_stacks.append(dev)
    await dev.wait_running(120)
    victim = next(c for c in dev.children() if any("redis-server" in part for part in c.cmdline()))
    victim.kill()
    code, err = dev.finish()
    assert code == EXIT_CRASHED, err
    assert f"Redis (pid {victim.pid}, port {6384 + offset}) killed by signal 9" in err


async def test_dev_with_redis_unreachable_says_so(
    stack: Stack, tmp_path: Path, dev_stacks: list[DevStack]
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    dev, banner = await _start_dev(stack, tmp_path, dev_stacks, REDIS_URL=dead_redis)
    assert "UNREACHABLE" in banner and "REDIS_URL" in banner
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(dev.url(8001) + "/ready")).status_code == 200
        projector = await client.get(dev.url(8003) + "/ready")
        assert projector.status_code == 503 and projector.json()["checks"]["redis"] != "ok"
        # As the banner says: the write is queued and the sweep of the write DB projects it.
        written = await client.post(dev.url(8007) + "/write", json={"key": "q", "value": "1"})
        assert written.json()["queued"] is True
        position = written.json()["position"]
        read = await client.get(dev.url(8002) + f"/read/q?position={position}&timeout=10")
        assert read.json()["position_reached"] is True
    status = run_cli("status", env={**stack.env, "REDIS_URL": dead_redis})
    assert status.returncode == 0 and "Redis unreachable" in status.stderr


async def test_a_port_in_use_says_how_to_move_the_stack(stack: Stack, tmp_path: Path) -> None:
    offset = _free_offset()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 8002 + offset))
        taken.listen()
        done = await asyncio.to_thread(
            run_cli, "dev", "--port-offset", str(offset), "--data-dir", str(tmp_path), env=stack.env
        )
        assert done.returncode == EXIT_PORT_IN_USE, done.stderr
        assert f"{8002 + offset} (the read-api)" in done.stderr
        assert "--port-offset" in done.stderr and "Traceback" not in done.stderr
        server = run_cli("api", "--port", str(8002 + offset), env=stack.env)
        assert server.returncode == EXIT_PORT_IN_USE and "--port" in server.stderr


def test_the_dev_stack_needs_no_test_tools() -> None:
    # [dev-servers] alone has no httpx: importing the dev stack must not need it.
    probe = "import sys; sys.modules['httpx'] = None; import cqrs_stack.devstack"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- what a person sees at the APIs' addresses --------------------------------------------


async def test_docs_reference_no_other_host_and_index_lists_the_endpoints(stack: Stack) -> None:
    api = await stack.launch("api")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        page = (await client.get("/docs")).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and "://" not in page, page  # no CDN: every asset from this server
        for asset in assets:
            answer = await client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 1000, asset
        redoc = (await client.get("/redoc")).text
        assert "://" not in redoc
        index = (await client.get("/")).json()
    assert index["docs"] == "/docs"
    assert {"POST /write", "PUT /write", "GET /read/{key}", "GET /stats"} <= set(index["endpoints"])


async def test_split_ports_answer_the_other_side_405_saying_where_it_is(stack: Stack) -> None:
    read_api = await stack.launch("read-api")
    write_api = await stack.launch("write-api")
    async with httpx.AsyncClient(timeout=10) as client:
        write_on_read = await client.post(f"{read_api.url}/write", json={"key": "k", "value": "v"})
        read_on_write = await client.get(f"{write_api.url}/read/k")
    for answer, where in ((write_on_read, "write API"), (read_on_write, "read API")):
        assert answer.status_code == 405 and answer.headers["allow"] == ""
        assert answer.json()["error"] == "method_not_allowed" and where in answer.json()["message"]
    assert await stack.scalar(stack.write_engine, "SELECT count(*) FROM commands") == 0


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is missing (Debian's chromium; .ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


async def test_docs_render_in_a_browser_that_reaches_no_other_host(
    stack: Stack, tmp_path: Path
) -> None:
    chromium = _chromium()
    api = await stack.launch("api")
    offline = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        # Every host name but this machine's fails: a CDN asset could not load.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1200,900",
        "--virtual-time-budget=8000",  # let Swagger UI fetch /openapi.json and render
    ]
    shot = tmp_path / "docs.png"
    dom = await asyncio.to_thread(
        subprocess.run,
        [*offline, "--dump-dom", f"{api.url}/docs"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert 'class="opblock' in dom.stdout and "/write" in dom.stdout, dom.stderr[-2000:]
    await asyncio.to_thread(
        subprocess.run,
        [*offline, f"--screenshot={shot}", f"{api.url}/docs"],
        capture_output=True,
        timeout=90,
    )
    from matplotlib import image

    pixels = image.imread(shot)
    # A blank page is one colour; the rendered UI has its coloured operation blocks.
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97]}) > 20


# --- the Makefile a newcomer meets first --------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    planned = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert planned.returncode == 0, planned.stderr
    assert "requirements/run.lock" in planned.stdout and "--require-hashes" in planned.stdout
    assert "test.lock" not in planned.stdout and "[test]" not in planned.stdout


def test_make_help_aligns_its_columns() -> None:
    shown = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True)
    starts = {re.match(r"  \S+\s+", line).end() for line in shown.stdout.splitlines()}  # type: ignore[union-attr]
    assert len(starts) == 1, shown.stdout

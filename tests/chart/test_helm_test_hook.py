"""The chart's `helm test` hook: rendered as a test Pod of the release's stack image, and its
script run for real against a real stack (write API, read API, projector on real PostgreSQL
and Redis) as the Pod would run it: the same command, the same environment but the URLs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from cqrs_stack.localservers import free_port
from tests.chart.chart import CHART, NAMESPACE, RELEASE, Doc, helm, one, render
from tests.fixtures.stack import Stack

TOKEN = "hook-test-token"
TOKEN_SETS = ("stack.writeApi.auth.tokenSecret.name=write-token",)


def hook_pod(*sets: str) -> Doc:
    docs = render(None, *sets)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def test_the_hook_is_a_test_pod_of_the_stack_image() -> None:
    pod = hook_pod("stack.image.tag=1.2.3")
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "cqrs-stack:1.2.3"  # the release's stack image
    assert container["command"] == ["python", "-c"]
    env = {e["name"]: e for e in container["env"]}
    assert env["WRITE_URL"]["value"] == f"http://{RELEASE}-write-api.{NAMESPACE}.svc"
    assert env["READ_URL"]["value"] == f"http://{RELEASE}-read-api.{NAMESPACE}.svc"
    assert "WRITE_API_TOKEN" not in env  # no token when writes need none

    with_token = hook_pod(*TOKEN_SETS)["spec"]["containers"][0]
    ref = {e["name"]: e for e in with_token["env"]}["WRITE_API_TOKEN"]["valueFrom"]
    assert ref == {"secretKeyRef": {"name": "write-token", "key": "token"}}

    named = hook_pod("stack.name=orders")["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in named["env"]}["WRITE_URL"] == (
        f"http://orders-write-api.{NAMESPACE}.svc"
    )
    assert not [d for d in render(None, "helmTest.enabled=false") if d["kind"] == "Pod"]
    assert not [d for d in render(None, "stack.enabled=false") if d["kind"] == "Pod"]


def run_hook(pod: Doc, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """The Pod's command with its environment, ``env`` replacing the cluster-only values."""
    container = pod["spec"]["containers"][0]
    base = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    command = [sys.executable if container["command"][0] == "python" else "?"]
    command += container["command"][1:] + container["args"]
    return subprocess.run(
        command,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_the_hook_writes_and_reads_back_through_a_real_stack(stack: Stack) -> None:
    writer = await stack.launch("write-api", WRITE_API_TOKEN=TOKEN)
    reader = await stack.launch("read-api")
    pod = hook_pod(*TOKEN_SETS)
    urls = {"WRITE_URL": writer.url, "READ_URL": reader.url, "TEST_TIMEOUT": "5"}

    # No projector yet: the write is acknowledged, the read model never reaches it.
    started = time.monotonic()
    stuck = await asyncio.to_thread(run_hook, pod, {**urls, "WRITE_API_TOKEN": TOKEN}, 60)
    assert stuck.returncode == 1, stuck
    assert "did not reach position" in stuck.stderr and "projector" in stuck.stderr
    assert time.monotonic() - started < 5 + 10 + 5  # the timeout, one read's wait, margin

    await stack.launch("projector")
    done = await asyncio.to_thread(run_hook, pod, {**urls, "WRITE_API_TOKEN": TOKEN}, 60)
    assert done.returncode == 0, done.stderr
    assert "helm test passed" in done.stdout

    bad = "not-the-token-7f3a"
    wrong = await asyncio.to_thread(run_hook, pod, {**urls, "WRITE_API_TOKEN": bad}, 60)
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr, wrong.stderr
    assert bad not in wrong.stderr + wrong.stdout  # a token is never echoed


async def test_the_hook_says_which_api_is_unreachable() -> None:
    pod = hook_pod()
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"WRITE_URL": dead, "READ_URL": dead, "TEST_TIMEOUT": "1"}
    result = await asyncio.to_thread(run_hook, pod, env, 30)
    assert result.returncode == 1
    assert f"POST {dead}/write: unreachable" in result.stderr


@pytest.mark.parametrize("value", ["600", "5"])
def test_the_timeout_is_a_value(value: str) -> None:
    container = hook_pod(f"helmTest.timeout={value}")["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["TEST_TIMEOUT"] == value
    refused = helm("template", RELEASE, str(CHART), "--set", "helmTest.timeout=601", check=False)
    assert refused.returncode != 0 and "helmTest" in refused.stderr

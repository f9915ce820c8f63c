"""The chart's `helm test` hook: rendered as a test Pod of the release's stack image, and its
script run for real against a real stack (write API, read API, projector on real PostgreSQL
and Redis) as the Pod would run it: the same command, the same environment but the URLs.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

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
    # The time the projector takes to catch up on a loaded machine is not what is tested here.
    urls["TEST_TIMEOUT"] = "30"
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


class FakeApis:
    """A write and read API on loopback that answer as told: ``mode`` "hang" (the write is
    received, never answered), "html" (a 200 with no JSON), "slow-read" (reads answer 0.8 s
    after their wait, never reaching the position), "drop-first" (the first write
    is received and its connection closed unanswered; later ones answered). Reads answer
    the last written value. Every write's Idempotency-Key is recorded."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.keys: list[str | None] = []
        self.value: str | None = None
        self.release = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: str, ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                fake.keys.append(self.headers.get("idempotency-key"))
                if fake.mode == "hang":
                    fake.release.wait(60)
                    return
                if fake.mode == "html":
                    self._send("<html>a proxy says hi</html>", "text/html")
                    return
                if fake.mode == "drop-first" and len(fake.keys) == 1:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                fake.value = json.loads(raw)["value"]
                self._send(json.dumps({"success": True, "position": "7"}))

            def do_GET(self) -> None:
                if fake.mode == "slow-read":
                    # A loaded read API: its wait for the position, then 0.8 s more.
                    query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                    time.sleep(float(query["timeout"][0]) + 0.8)
                    self._send(json.dumps({"success": True, "position_reached": False}))
                    return
                answer = {"success": True, "position_reached": True, "value": fake.value}
                self._send(json.dumps(answer))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeApis:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_silent_write_api_fails_the_test_within_its_timeout_without_a_second_write() -> None:
    timeout = 3
    with FakeApis("hang") as fake:
        env = {"WRITE_URL": fake.url, "READ_URL": fake.url, "TEST_TIMEOUT": str(timeout)}
        started = time.monotonic()
        result = run_hook(hook_pod(), env, 60)
        took = time.monotonic() - started
    assert result.returncode == 1, result
    assert "helm test FAILED:" in result.stderr and "Traceback" not in result.stderr
    assert took < timeout + 2, f"ran {took:.1f} s for a {timeout} s timeout"
    assert len(fake.keys) == 1, fake.keys  # the write received is not sent again


def test_a_slow_read_api_at_the_deadline_is_reported_as_a_position_not_reached() -> None:
    """The last try is not cut short by the deadline: a read API that answers slowly but
    answers is never reported as unreachable."""
    with FakeApis("slow-read") as fake:
        env = {"WRITE_URL": fake.url, "READ_URL": fake.url, "TEST_TIMEOUT": "4"}
        result = run_hook(hook_pod(), env, 60)
    assert result.returncode == 1
    assert "did not reach position 7" in result.stderr, result.stderr
    assert "unreachable" not in result.stderr, result.stderr


def test_a_write_retried_after_a_lost_answer_carries_the_same_idempotency_key() -> None:
    with FakeApis("drop-first") as fake:
        env = {"WRITE_URL": fake.url, "READ_URL": fake.url, "TEST_TIMEOUT": "10"}
        result = run_hook(hook_pod(), env, 60)
    assert result.returncode == 0, result.stderr
    assert len(fake.keys) == 2 and fake.keys[0] and fake.keys[0] == fake.keys[1], fake.keys


def test_a_200_that_is_no_json_is_a_failed_line_not_a_traceback() -> None:
    with FakeApis("html") as fake:
        env = {"WRITE_URL": fake.url, "READ_URL": fake.url, "TEST_TIMEOUT": "5"}
        result = run_hook(hook_pod(), env, 60)
    assert result.returncode == 1
    assert "helm test FAILED:" in result.stderr and "no JSON" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

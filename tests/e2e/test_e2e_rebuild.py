"""End to end: a blue/green rebuild through the stack's spec while a client reads and writes.

Runs on the local cluster after the release is installed (tests/e2e/conftest.py). A stack of
its own on the release's servers gets commands, then ``spec.readModels[].version`` is raised:
the operator runs the rebuild as a Job of the stack's image, reports it in status and swaps
it in, while a client writes and reads its own writes back through the Services with no
error. The stack is deleted at the end.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.e2e.cluster import Cluster, wait_until
from tests.e2e.conftest import STACK_TIMEOUT, Namespace, wait_for_stack

STACK = "e2e-rebuild"
SEEDED = 200
CLIENT_MAX_OPS = 5000  # the client's bound, whatever happens
CLIENT_MAX_SECONDS = 600.0


def conditions(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (stack.get("status") or {}).get("conditions") or []}


class Client:
    """Writes a key, then reads it back at its position (read-your-writes), in a loop: every
    answer that is not a 200 with the value written is an error."""

    def __init__(self, write_url: str, read_url: str) -> None:
        self.write_url, self.read_url = write_url, read_url
        self.ops = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def once(self, http: httpx.Client, key: str, value: str) -> None:
        answer = http.post(f"{self.write_url}/write", json={"key": key, "value": value})
        if answer.status_code != 200:
            self.errors.append(f"write {key}: {answer.status_code} {answer.text[:200]}")
            return
        position = answer.json()["position"]
        params = {"position": position, "timeout": 20}
        read = http.get(f"{self.read_url}/read/{key}", params=params)
        body = read.json() if read.status_code == 200 else {}
        if read.status_code != 200 or body.get("value") != value or not body["position_reached"]:
            self.errors.append(f"read {key}: {read.status_code} {read.text[:200]}")
        self.ops += 1

    def run(self) -> None:
        deadline = time.monotonic() + CLIENT_MAX_SECONDS
        with httpx.Client(timeout=30) as http:
            for i in range(CLIENT_MAX_OPS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    self.once(http, f"rebuild:live:{i % 50}", f"v{i}")
                except httpx.HTTPError as exc:
                    self.errors.append(f"op {i}: {type(exc).__name__}: {exc}")


def test_a_version_bump_rebuilds_while_a_client_reads_and_writes(
    cluster: Cluster, namespace: Namespace, release: str
) -> None:
    first = cluster.get("cqrsstack", release, namespace.name)
    assert first is not None
    databases = {
        which: {
            **first["spec"]["databases"][which],
            "database": f"e2e_{namespace.suffix}_rb_{which}",
        }
        for which in ("write", "read")
    }
    spec = {
        "image": first["spec"]["image"],
        "writeApi": {"replicas": 1},
        "readApi": {"replicas": 1},
        "projector": {"replicas": 1},
        "readModels": [{"name": "records", "version": 1}],
        "databases": databases,
        "redis": first["spec"]["redis"],
        "deletionPolicy": "Delete",
    }
    manifest = {"apiVersion": "cqrs.dev/v1alpha1", "kind": "CqrsStack"}
    cluster.apply({**manifest, "metadata": {"name": STACK}, "spec": spec}, namespace.name)
    try:
        wait_for_stack(cluster, STACK, namespace.name)
        with (
            cluster.port_forward(f"{STACK}-write-api", 80, namespace.name) as write_url,
            cluster.port_forward(f"{STACK}-read-api", 80, namespace.name) as read_url,
        ):
            with httpx.Client(timeout=30) as http:
                for i in range(SEEDED):
                    answer = http.post(f"{write_url}/write", json={"key": f"rb:{i}", "value": "s"})
                    assert answer.status_code == 200, answer.text
                read = http.get(f"{read_url}/read/rb:0", params={"position": 1, "timeout": 20})
                assert read.status_code == 200 and read.json()["success"], read.text
                counted = read.json()["read_count"]

            client = Client(write_url, read_url)
            client.thread.start()
            try:
                wait_until("the client's first operations", lambda: client.ops >= 5, 60)
                cluster.kubectl(
                    "patch", "cqrsstack", STACK, "-n", namespace.name, "--type=merge",
                    "-p", '{"spec": {"readModels": [{"name": "records", "version": 2}]}}',
                )  # fmt: skip

                def swapped() -> dict[str, Any] | None:
                    stack = cluster.get("cqrsstack", STACK, namespace.name) or {}
                    rebuilding = conditions(stack).get("Rebuilding", {})
                    return stack if rebuilding.get("reason") in ("Swapped", "Failed") else None

                stack = wait_until(
                    "Rebuilding=False after the swap",
                    swapped,
                    STACK_TIMEOUT,
                    diagnose=lambda: cluster.diagnostics(namespace.name),
                )
                ops_at_swap = client.ops
                # A while more after the swap: reads and writes of the new version.
                wait_until("operations after the swap", lambda: client.ops >= ops_at_swap + 20, 60)
            finally:
                client.stop.set()
                client.thread.join(60)
            assert not client.errors, client.errors[:10]
            assert client.ops >= 25
            st = stack["status"]
            conds = conditions(stack)
            if conds["Rebuilding"]["reason"] != "Swapped":
                job_log = cluster.kubectl(
                    "logs", "-n", namespace.name, f"job/{st['rebuild']['job']}", "--tail=60",
                    check=False,
                )  # fmt: skip
                raise AssertionError(
                    f"the rebuild did not swap: {st['rebuild']}\n{job_log.stdout[-4000:]}"
                    f"{job_log.stderr[-1000:]}"
                )
            assert conds["Ready"]["status"] == "True", conds
            assert {m["name"]: m["version"] for m in st["readModels"]} == {"records": 2}
            assert st["rebuild"]["outcome"] == "Swapped" and st["rebuild"]["phase"] == "done"
            assert st["rebuild"]["total"] >= SEEDED and st["rebuild"]["percent"] == 100.0
            job = cluster.get("job", st["rebuild"]["job"], namespace.name)
            assert job is not None
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[:5] == ["rebuild", "--model", "records", "--version", "2"], args
            with httpx.Client(timeout=30) as http:
                # The seeded keys were rebuilt from the write DB; their read count survived.
                read = http.get(f"{read_url}/read/rb:0")
                assert read.status_code == 200 and read.json()["value"] == "s", read.text
                assert read.json()["read_count"] >= counted + 1, read.json()
                last = http.get(f"{read_url}/read/rb:{SEEDED - 1}")
                assert last.json()["success"], last.text
        events = cluster.kubectl(
            "get", "events", "-n", namespace.name, "--field-selector",
            f"involvedObject.name={STACK}", "-o", "jsonpath={.items[*].reason}",
        ).stdout.split()  # fmt: skip
        assert {"RebuildStarted", "RebuildSwapped"} <= set(events), events
    finally:
        cluster.kubectl(
            "delete", "cqrsstack", STACK, "-n", namespace.name, "--wait", "--timeout=180s",
            timeout=200,
        )  # fmt: skip

"""A stand-in for the kubelet and the Job controller, neither of which runs in these tests.

``run_migration_jobs`` does for a stack's migration Jobs what a cluster would: it runs the
Job's container command (the ``cqrs-stack`` of this tree, as the image would) with the
Job's environment resolved from the Secrets and ConfigMaps it names, the CA volumes
materialised and the termination message file redirected; then it records a Pod whose
container terminated with that exit code and message, and marks the Job Complete or Failed
in its status, as the Job controller would. ``fail_migration_job`` records a failure
without running anything (an image whose migration crashes).

The stack's rebuild Jobs (component ``rebuild``) are run the same way by ``run_jobs``
(``cqrs-stack rebuild --model M --version N --run-id <Job>`` against the test's servers), or
failed with ``fail_jobs``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 60.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_files(target: Path, files: dict[str, str]) -> Path:
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    return target


def _read_file(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def pending_jobs(
    api: client.ApiClient, namespace: str, stack: str, component: str = "migrate"
) -> list[Any]:
    """The stack's Jobs of ``component`` (migrate, rebuild) that have not finished."""
    selector = f"app.kubernetes.io/instance={stack},app.kubernetes.io/component={component}"
    jobs = await client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector)
    return [
        job
        for job in jobs.items
        if not any(
            c.type in ("Complete", "Failed") and c.status == "True"
            for c in (job.status.conditions or [])
        )
    ]


async def _environment(
    api: client.ApiClient, namespace: str, pod: Any, folder: Path
) -> tuple[dict[str, str], str]:
    """The container's environment as the kubelet builds it; the termination message path."""
    core = client.CoreV1Api(api)
    container = pod.containers[0]
    mounts: dict[str, Path] = {}
    for volume in pod.volumes or []:
        source = volume.config_map or volume.secret
        if source is None or not source.items:
            continue
        if volume.secret is not None:
            raw = (await core.read_namespaced_secret(volume.secret.secret_name, namespace)).data
            data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
        else:
            data = (await core.read_namespaced_config_map(volume.config_map.name, namespace)).data
        target = _write_files(folder / volume.name, {i.path: data[i.key] for i in source.items})
        mount = next(m for m in container.volume_mounts if m.name == volume.name)
        mounts[mount.mount_path] = target
    env: dict[str, str] = {}
    for ref in container.env_from or []:
        if ref.config_map_ref is not None:
            cm = await core.read_namespaced_config_map(ref.config_map_ref.name, namespace)
            env.update(cm.data or {})
    for var in container.env or []:
        if var.value_from is not None:
            key_ref = var.value_from.secret_key_ref
            secret = await core.read_namespaced_secret(key_ref.name, namespace)
            env[var.name] = base64.b64decode(secret.data[key_ref.key]).decode()
        else:
            env[var.name] = var.value or ""
    for path, target in mounts.items():
        env = {k: v.replace(path, str(target)) for k, v in env.items()}
    report = str(folder / "termination-log")
    env = {k: report if v == container.termination_message_path else v for k, v in env.items()}
    return env, report


async def _record(
    api: client.ApiClient, namespace: str, job: Any, exit_code: int, message: str
) -> None:
    """A terminated Pod of the Job, and the Job's terminal status."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    name = job.metadata.name
    template = job.spec.template
    container = template.spec.containers[0]
    pod_name = f"{name}-standin"
    await core.create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": pod_name,
                "labels": template.metadata.labels,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job.metadata.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": container.name, "image": container.image}],
            },
        },
    )
    done = exit_code == 0
    state = {
        "exitCode": exit_code,
        "reason": "Completed" if done else "Error",
        "message": message[-4096:],
        "startedAt": _now(),
        "finishedAt": _now(),
    }
    await core.patch_namespaced_pod_status(
        pod_name,
        namespace,
        {
            "status": {
                "phase": "Succeeded" if done else "Failed",
                "containerStatuses": [
                    {
                        "name": container.name,
                        "image": container.image,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": state},
                    }
                ],
            }
        },
    )
    now = _now()
    if done:
        conditions = [
            {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
        ]
        counts = {"succeeded": 1, "completionTime": now}
    else:
        conditions = [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
        ]
        counts = {"failed": 1}
    for cond in conditions:
        cond.update(lastProbeTime=now, lastTransitionTime=now)
    await batch.patch_namespaced_job_status(
        name,
        namespace,
        {"status": {"startTime": now, "conditions": conditions, "active": 0, **counts}},
    )


async def run_migration_jobs(api: client.ApiClient, namespace: str, stack: str) -> int:
    """Run each pending migration Job of ``stack`` as the kubelet would; return how many."""
    return await run_jobs(api, namespace, stack, "migrate")


async def run_jobs(api: client.ApiClient, namespace: str, stack: str, component: str) -> int:
    """Run each pending Job of ``stack``'s ``component`` as the kubelet would; how many."""
    jobs = await pending_jobs(api, namespace, stack, component)
    for job in jobs:
        container = job.spec.template.spec.containers[0]
        with tempfile.TemporaryDirectory(prefix="standin-") as folder:
            env, report = await _environment(api, namespace, job.spec.template.spec, Path(folder))
            process = await asyncio.create_subprocess_exec(
                str(BIN / container.command[0]),
                *container.args,
                env={"PATH": os.environ.get("PATH", ""), "HOME": folder, **env},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
            code = process.returncode or 0
            written = _read_file(Path(report))
        # terminationMessagePolicy FallbackToLogsOnError: the log tail when nothing was written.
        message = written or (output.decode(errors="replace") if code else "")
        await _record(api, namespace, job, code, message)
    return len(jobs)


async def fail_migration_job(
    api: client.ApiClient, namespace: str, stack: str, message: str, exit_code: int = 1
) -> int:
    """Record each pending migration Job of ``stack`` as failed with ``message``."""
    return await fail_jobs(api, namespace, stack, "migrate", message, exit_code)


async def fail_jobs(
    api: client.ApiClient,
    namespace: str,
    stack: str,
    component: str,
    message: str,
    exit_code: int = 1,
) -> int:
    """Record each pending Job of ``stack``'s ``component`` as failed with ``message``."""
    jobs = await pending_jobs(api, namespace, stack, component)
    for job in jobs:
        await _record(api, namespace, job, exit_code, message)
    return len(jobs)


async def run_migration_job_when_created(
    api: client.ApiClient, namespace: str, stack: str, timeout: float = 30.0
) -> None:
    """Wait (bounded) for the operator to create the stack's migration Job, then run it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await run_migration_jobs(api, namespace, stack):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no migration Job of stack {stack} within {timeout:.0f} s")
        await asyncio.sleep(0.2)

"""Rendering the chart with the real helm, and reading what it renders.

Every test of tests/chart goes through :func:`render` (``helm template``) or :func:`helm`.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.helm import helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cqrs-stack"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# The default values and every example values file: what each test renders.
VALUES_FILES: list[Path | None] = [None, *EXAMPLES]
RELEASE = "cqrs"
NAMESPACE = "shop"
HELM_TIMEOUT = 60

Doc = dict[str, Any]
POD_OWNERS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")


def values_id(path: Path | None) -> str:
    return "default" if path is None else path.name


def helm(
    *args: str, check: bool = True, timeout: float = HELM_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run helm with ``args``; with ``check`` fail the test with helm's stderr."""
    done = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stderr}"
    return done


def template_args(
    values_file: Path | None = None,
    *sets: str,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    api_versions: tuple[str, ...] = (),
    chart: Path = CHART,
) -> list[str]:
    args = ["template", release, str(chart), "--namespace", namespace]
    if values_file is not None:
        args += ["--values", str(values_file)]
    for value in sets:
        args += ["--set", value]
    for api in api_versions:  # what the cluster serves beyond the built-in APIs
        args += ["--api-versions", api]
    return args


def render(
    values_file: Path | None = None,
    *sets: str,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    api_versions: tuple[str, ...] = (),
) -> list[Doc]:
    """``helm template`` of the whole chart, as a list of objects."""
    done = helm(
        *template_args(
            values_file, *sets, release=release, namespace=namespace, api_versions=api_versions
        )
    )
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_notes(*sets: str, api_versions: tuple[str, ...] = (), workdir: Path) -> str:
    """NOTES.txt as ``helm install`` would print it (``helm template`` prints no notes): a copy
    of the chart in ``workdir`` renders it through a probe template, with the same values."""
    chart = workdir / CHART.name
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_probe.tpl").write_text(
        '{{- define "probe.notes" }}' + notes + "{{- end }}"
    )
    (chart / "templates" / "notes-probe.yaml").write_text(
        'notes: {{ include "probe.notes" . | toJson }}\n'
    )
    args = template_args(None, *sets, api_versions=api_versions, chart=chart)
    done = helm(*args, "--show-only", "templates/notes-probe.yaml")
    text: str = yaml.safe_load(done.stdout)["notes"]
    return text


def render_error(*sets: str, values_file: Path | None = None) -> str:
    """``helm template`` that must fail; returns helm's error text."""
    done = helm(*template_args(values_file, *sets), check=False)
    assert done.returncode != 0, f"helm accepted {sets}:\n{done.stdout[:2000]}"
    return done.stderr


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    for doc in of_kind(docs, kind):
        if doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} named {name!r} in {[d['metadata']['name'] for d in docs]}")


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(``Kind/name``, pod template spec) of every workload rendered."""
    for doc in docs:
        if doc["kind"] in POD_OWNERS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":  # the `helm test` hook
            yield f"Pod/{doc['metadata']['name']}", doc["spec"]
        elif doc["kind"] == "CronJob":
            job = doc["spec"]["jobTemplate"]["spec"]
            yield f"CronJob/{doc['metadata']['name']}", job["template"]["spec"]


def secret_data(secret: Doc) -> dict[str, str]:
    """A Secret's data and stringData, decoded."""
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Does a LabelSelector (matchLabels + matchExpressions) select ``labels``?"""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True

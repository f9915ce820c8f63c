"""spec.tracing against the real API server, with the operator running: the pods of every
workload get TRACING and the OTEL_* variables, turning it off takes them out again, and
values past the spec's bounds are refused by the API server's schema."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_operator.manifests import TRACING_POD_NAME
from cqrs_operator.spec import SpecError, parse_spec
from tests.operator.fixtures_operator import (
    COMPONENTS,
    GROUP,
    PLURAL,
    VERSION,
    Env,
    Stacks,
    stack_manifest,
    wait_until,
)
from tests.unit.test_spec import ACCEPTED_ENDPOINTS, REFUSED_ENDPOINTS

COLLECTOR = "http://otel-collector.observability:4318"


async def container_env(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The applied Deployment's container environment: name -> the V1EnvVar."""
    dep = await client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    return {e.name: e for e in dep.spec.template.spec.containers[0].env or []}


def tracing_names(env: dict[str, Any]) -> set[str]:
    return {n for n in env if n == "TRACING" or n.startswith("OTEL_") or n == TRACING_POD_NAME}


async def test_tracing_reaches_every_deployment_and_turning_it_off_takes_it_out(
    env: Env,
) -> None:
    tracing = {"enabled": True, "endpoint": COLLECTOR, "sampleRatio": 0.2}
    await env.stacks.create(env.manifest("traced", tracing=tracing))
    await env.stacks.wait_ready("traced", env.operator)
    for component in COMPONENTS:
        found = await container_env(env.api, env.namespace, f"traced-{component}")
        values = {name: var.value for name, var in found.items()}
        assert values["TRACING"] == "true"
        assert values["OTEL_SERVICE_NAME"] == f"traced-{component}"
        assert values["OTEL_EXPORTER_OTLP_ENDPOINT"] == COLLECTOR
        assert values["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert values["OTEL_TRACES_SAMPLER_ARG"] == "0.2"
        assert f"k8s.namespace.name={env.namespace}" in values["OTEL_RESOURCE_ATTRIBUTES"]
        assert found[TRACING_POD_NAME].value_from.field_ref.field_path == "metadata.name"
        # The stack's own variables are still there beside them.
        assert "WRITE_DB_URL" in found and "REDIS_URL" in found

    await env.stacks.patch("traced", {"spec": {"tracing": {"enabled": False}}})
    await env.stacks.wait_ready("traced", env.operator)

    async def untraced() -> bool:
        for component in COMPONENTS:
            found = await container_env(env.api, env.namespace, f"traced-{component}")
            if tracing_names(found) or "WRITE_DB_URL" not in found:
                return False
        return True

    await wait_until(
        untraced,
        timeout=30,
        what="no tracing variable left in any Deployment",
        alive=env.operator.exit_reason,
    )


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ({"enabled": True}, "spec.tracing.endpoint is required when tracing is enabled"),
        ({"sampleRatio": 1.5}, "spec.tracing.sampleRatio"),
        ({"sampleRatio": -0.1}, "spec.tracing.sampleRatio"),
        ({"enabled": True, "endpoint": "otel-collector:4318"}, "spec.tracing.endpoint"),
        ({"enabled": True, "endpoint": "http://user:secret@otel:4318"}, "spec.tracing.endpoint"),
        ({"enabled": True, "endpoint": "http://c/" + "p" * 2040}, "spec.tracing.endpoint"),
        # The kubelet would expand it to the write DB's URL, password and all.
        ({"enabled": True, "endpoint": "http://c:4318/$(WRITE_DB_URL)"}, "spec.tracing.endpoint"),
        ({"enabled": True, "endpoint": "http://coll\u00a0ector:4318"}, "spec.tracing.endpoint"),
    ],
    ids=[
        "no-endpoint",
        "ratio-over-1",
        "ratio-below-0",
        "no-scheme",
        "login",
        "too-long",
        "kubelet-reference",
        "no-break-space",
    ],
)
async def test_invalid_tracing_is_refused_by_the_api_server(
    stacks: Stacks,
    write_pg: Any,
    read_pg: Any,
    fresh_names: str,
    tracing: dict[str, Any],
    message: str,
) -> None:
    manifest = stack_manifest("bad", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    manifest["spec"]["tracing"] = tracing
    with pytest.raises(ApiException) as refused:
        await stacks.create(manifest)
    assert refused.value.status == 422
    assert message in refused.value.body


async def test_the_api_server_and_the_operator_agree_on_every_endpoint(
    stacks: Stacks, write_pg: Any, read_pg: Any, fresh_names: str
) -> None:
    """The CRD's pattern, read by the API server (RE2), and the operator's check (Python) give
    one verdict on each endpoint of the spec tests (Unicode and ASCII-only spaces, $(VAR), a
    login, a query, IPv6, percent-escapes): an endpoint the API server takes never makes a
    stack Failed in the operator, one it refuses the operator refuses too."""
    manifest = stack_manifest("agree", fresh_names, write_pg, read_pg, "redis://127.0.0.1:1/0")
    custom = client.CustomObjectsApi(stacks.api)
    differ: list[str] = []
    for endpoint in ACCEPTED_ENDPOINTS + REFUSED_ENDPOINTS:
        manifest["spec"]["tracing"] = {"enabled": True, "endpoint": endpoint}
        try:
            parse_spec(manifest["spec"], namespace=stacks.namespace, name="agree")
            operator_takes = True
        except SpecError:
            operator_takes = False
        try:
            await custom.create_namespaced_custom_object(
                GROUP, VERSION, stacks.namespace, PLURAL, manifest, dry_run="All"
            )
            api_server_takes = True
        except ApiException as exc:
            assert exc.status == 422, exc.body
            api_server_takes = False
        if operator_takes != api_server_takes or operator_takes != (endpoint in ACCEPTED_ENDPOINTS):
            differ.append(f"{endpoint!r}: api-server={api_server_takes} operator={operator_takes}")
    assert not differ, differ

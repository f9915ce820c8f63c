"""values.schema.json and the templates refuse bad values, naming the field."""

from __future__ import annotations

import json

import pytest

from tests.chart.chart import CHART, helm, render_error


def test_schema_is_draft_07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    for section in ("operator", "stack", "devDatabases", "ingress", "networkPolicy", "rbac"):
        assert schema["properties"][section]["additionalProperties"] is False, section


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("stack.writeApi.replicas=-1", ["/stack/writeApi/replicas", "minimum"]),
        ("stack.readApi.replicas=51", ["/stack/readApi/replicas", "maximum"]),
        ("stack.projector.batchSize=0", ["/stack/projector/batchSize", "minimum"]),
        ("stack.writeApi.replicas=two", ["/stack/writeApi/replicas", "integer"]),
        ("operator.unknownKey=1", ["/operator", "unknownKey"]),
        ("surprise=1", ["surprise"]),
        ("stack.deletionPolicy=Sometimes", ["/stack/deletionPolicy"]),
        ("operator.image.pullPolicy=Sometimes", ["/operator/image/pullPolicy"]),
        ("operator.logLevel=verbose", ["/operator/logLevel"]),
        ("stack.name=Not_A_Name", ["/stack/name"]),
        ("operator.watchNamespaces={Bad_Ns}", ["/operator/watchNamespaces/0"]),
        ("stack.databases.write.port=70000", ["/stack/databases/write/port", "maximum"]),
        ("stack.databases.read.database=drop;table", ["/stack/databases/read/database"]),
        ("stack.image.tag=bad tag!", ["/stack/image/tag"]),
        ("stack.redis.url=http://redis", ["/stack/redis/url"]),
        (
            "devDatabases.postgresql.persistence.size=lots",
            ["/devDatabases/postgresql/persistence/size"],
        ),
        ("ingress.host=Bad_Host", ["/ingress/host"]),
        ("operator.resources.requests=null", ["/operator/resources"]),
        ("devDatabases.redis.maxMemory=all", ["/devDatabases/redis/maxMemory"]),
        # The stack part is generated from the spec models: their bounds and enums hold here.
        (
            "stack.readModels[0].name=records,stack.readModels[1].name=records",
            ["/stack/readModels"],
        ),
        ("stack.readModels[0].name=ledger", ["/stack/readModels/0"]),
        ("stack.readModels[0].version=0", ["/stack/readModels/0/version", "minimum"]),
        ("stack.projector.autoscaling.engine=hpa", ["/stack/projector/autoscaling/engine"]),
        ("stack.writeApi.autoscaling.minReplicas=0", ["/stack/writeApi/autoscaling/minReplicas"]),
        ("stack.databases.pool.maxSize=1001", ["/stack/databases/pool/maxSize", "maximum"]),
        ("stack.stream.maxLength=1000000000001", ["/stack/stream/maxLength", "maximum"]),
        ("stack.readApi.tolerations[0].effect=Sometimes", ["/stack/readApi/tolerations/0"]),
        ("stack.tracing.endpoint=otel:4318", ["/stack/tracing/endpoint"]),
        # The kubelet would expand it to the write DB's URL, password and all.
        ("stack.tracing.endpoint=http://c:4318/$(WRITE_DB_URL)", ["/stack/tracing/endpoint"]),
        ("stack.tracing.enabled=yes", ["/stack/tracing/enabled"]),
    ],
)
def test_bad_values_are_refused_naming_the_field(value: str, expected: list[str]) -> None:
    error = render_error(value)
    for text in expected:
        assert text in error, error


def test_helm_lint_refuses_bad_values_too() -> None:
    done = helm("lint", str(CHART), "--set", "stack.projector.replicas=-3", check=False)
    assert done.returncode != 0
    assert "/stack/projector/replicas" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["devDatabases.enabled=false"], "stack.databases.write.host is required"),
        (
            [
                "devDatabases.enabled=false",
                "stack.databases.write.host=pg",
                "stack.databases.read.host=pg",
            ],
            "stack.databases.write.adminSecret is required",
        ),
        (
            [
                "devDatabases.enabled=false",
                "stack.databases.write.host=pg",
                "stack.databases.read.host=pg",
                "stack.databases.write.adminSecret=a",
                "stack.databases.read.adminSecret=a",
            ],
            "stack.redis.url or stack.redis.urlSecret is required",
        ),
        (
            ["stack.redis.url=redis://r:6379/0", "stack.redis.urlSecret.name=r"],
            "stack.redis: set url or urlSecret.name, not both",
        ),
        (["stack.redis.urlSecret.name=r"], "stack.redis.urlSecret.key is required"),
        (["ingress.enabled=true", "stack.enabled=false"], "ingress.enabled needs stack.enabled"),
        (
            ["stack.tracing.enabled=true"],
            "stack.tracing.endpoint is required when stack.tracing.enabled is true",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(sets: list[str], expected: str) -> None:
    assert expected in render_error(*sets)


def test_a_sample_ratio_between_0_and_1_needs_set_json_as_documented() -> None:
    """Helm's --set keeps 0.5 a string, which the schema refuses (it is not loosened): the
    chart's README and values.yaml say to use --set-json or a values file, which work."""
    on = ["--set", "stack.tracing.enabled=true", "--set", "stack.tracing.endpoint=http://c:4318"]
    base = ["template", "r", str(CHART), *on]
    as_string = helm(*base, "--set", "stack.tracing.sampleRatio=0.5", check=False)
    assert as_string.returncode != 0
    assert "/stack/tracing/sampleRatio" in as_string.stderr
    assert "sampleRatio: 0.5" in helm(*base, "--set-json", "stack.tracing.sampleRatio=0.5").stdout
    for doc in (CHART / "README.md", CHART / "values.yaml"):
        assert "--set-json stack.tracing.sampleRatio=0.5" in doc.read_text(), doc

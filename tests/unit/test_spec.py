"""Parsing a CqrsStack spec: defaults, derived names, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cqrs_operator.spec import (
    IDENTIFIER,
    SpecError,
    default_names,
    identity_hash,
    parse_spec,
    unique_identifier,
)
from cqrs_stack.stack_spec import MAX_POD_LABELS, OTLP_ENDPOINT_PATTERN


def minimal() -> dict:
    return {
        "databases": {
            "write": {"host": "pg-write.db", "adminSecret": "pg-admin"},
            "read": {"host": "pg-read.db", "adminSecret": "pg-admin"},
        },
        "redis": {"url": "redis://redis.db:6379/0"},
    }


def test_defaults_and_derived_names() -> None:
    stack = parse_spec(minimal(), namespace="shop", name="orders")
    digest = identity_hash("shop", "orders")
    assert stack.image == "cqrs-stack:0.1.0"
    assert stack.stream_name == "shop.orders-events"
    assert stack.consumer_group == "projectors"
    assert stack.write_db.name == f"shop_orders_{digest}_write"
    assert stack.read_db.name == f"shop_orders_{digest}_read"
    assert stack.write_db.port == 5432
    assert stack.role == f"cqrs_shop_orders_{digest}"
    assert (stack.write_api.replicas, stack.read_api.replicas) == (2, 2)  # as the CRD says
    assert stack.projector.batch_size == 500
    assert stack.deletion_policy == "Retain"
    assert not stack.projector.autoscaling.enabled


def test_dashes_and_leading_digits_become_valid_identifiers() -> None:
    stack = parse_spec(minimal(), namespace="1-team", name="my-app")
    assert stack.write_db.name == f"_1_team_my_app_{identity_hash('1-team', 'my-app')}_write"
    assert IDENTIFIER.match(stack.role)


def test_default_names_do_not_collide_where_dashes_map_to_underscores() -> None:
    """Namespace a-b + stack c and namespace a + stack b-c once both gave cqrs_a_b_c."""
    one, other = default_names("a-b", "c"), default_names("a", "b-c")
    assert one.role != other.role
    assert one.write_db != other.write_db and one.read_db != other.read_db
    assert one.stream != other.stream


def test_default_names_stay_within_63_bytes_at_the_longest_identity() -> None:
    names = default_names("n" * 63, "s" * 50)  # the longest namespace and stack name
    for name in (names.role, names.write_db, names.read_db):
        assert len(name.encode()) <= 63 and IDENTIFIER.match(name), name
    cut = default_names("n" * 63, "s" * 49 + "t")
    assert cut.role != names.role and cut.write_db != names.write_db  # the hash keeps them apart


def test_names_recorded_in_status_win_over_the_defaults() -> None:
    """A stack provisioned by an older operator keeps its names: no rename on upgrade."""
    status = {
        "databases": {
            "write": "shop_orders_write",
            "read": "shop_orders_read",
            "role": "cqrs_shop_orders",
        },
        "stream": {"name": "orders-events"},
    }
    stack = parse_spec(minimal(), namespace="shop", name="orders", status=status)
    assert (stack.write_db.name, stack.read_db.name, stack.role, stack.stream_name) == (
        "shop_orders_write",
        "shop_orders_read",
        "cqrs_shop_orders",
        "orders-events",
    )


def test_explicit_values_win() -> None:
    spec = minimal() | {
        "image": {"repository": "registry.local/cqrs", "tag": "1.2.3"},
        "projector": {"replicas": 4, "batchSize": 50},
        "stream": {"name": "custom", "consumerGroup": "g"},
        "deletionPolicy": "Delete",
    }
    spec["databases"]["write"]["database"] = "w_db"
    stack = parse_spec(spec, namespace="ns", name="n")
    assert (stack.image, stack.projector.replicas, stack.projector.batch_size) == (
        "registry.local/cqrs:1.2.3",
        4,
        50,
    )
    assert (stack.stream_name, stack.consumer_group, stack.write_db.name) == ("custom", "g", "w_db")
    assert stack.deletion_policy == "Delete"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda s: s["databases"]["write"].update(database="Bad-Name"),
            "spec.databases.write.database",
        ),
        (
            lambda s: s["databases"]["read"].update(database='x"; DROP'),
            "spec.databases.read.database",
        ),
        (lambda s: s.update(projector={"replicas": 51}), "spec.projector.replicas"),
        (lambda s: s.update(projector={"batchSize": 0}), "spec.projector.batchSize"),
        (lambda s: s.update(deletionPolicy="Destroy"), "spec.deletionPolicy"),
        (
            lambda s: s["databases"]["write"].update(adminSecret="Not_A_Secret"),
            "spec.databases.write.adminSecret",
        ),
        (lambda s: s.update(redis={}), "spec.redis"),
        (
            lambda s: s.update(projector={"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
            "spec.projector.autoscaling.maxReplicas",
        ),
    ],
)
def test_invalid_specs_name_the_field(mutate, field: str) -> None:
    spec = minimal()
    mutate(spec)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(spec, namespace="ns", name="n")


@given(
    st.text(min_size=0, max_size=300),
    st.sampled_from(["", "cqrs_"]),
    st.sampled_from(["", "_write", "_read"]),
)
def test_unique_identifier_is_always_valid(text: str, prefix: str, suffix: str) -> None:
    name = unique_identifier(prefix, text, "0123abcd", suffix)
    assert IDENTIFIER.match(name), name
    assert name.endswith(f"_0123abcd{suffix}")


def test_an_over_long_stack_name_is_refused() -> None:
    with pytest.raises(SpecError, match=r"metadata\.name must be at most 50"):
        parse_spec({"redis": {"url": "redis://r:6379/0"}}, namespace="shop", name="n" * 51)


# ------------------------------------------------------------------ the CRD agrees


CRD = (
    Path(__file__).resolve().parents[2]
    / "charts"
    / "cqrs-stack"
    / "crds"
    / "cqrsstacks.cqrs.dev.yaml"
)


def crd_spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_at(path: str) -> dict:
    node = crd_spec_schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


def bounded_integers() -> list[tuple[str, int, int]]:
    """(path under spec, minimum, maximum) of every integer field of the CRD's spec."""
    found: list[tuple[str, int, int]] = []

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "integer":
            found.append((path, node.get("minimum"), node.get("maximum")))
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}" if path else key)

    walk(crd_spec_schema(), "")
    return found


def with_value(path: str, value: int) -> dict:
    """The minimal spec with ``path`` set to ``value`` (a min*/max* field's sibling at its
    own maximum/minimum, so that min <= max holds)."""
    spec = minimal()
    *parents, key = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    siblings = schema_at(".".join(parents))["properties"] if parents else {}
    for mine, theirs, bound in (("min", "max", "maximum"), ("max", "min", "minimum")):
        sibling = theirs + key.removeprefix(mine)
        if key.startswith(mine) and sibling in siblings:
            node[sibling] = siblings[sibling][bound]
    return spec


def test_every_integer_of_the_crd_is_bounded() -> None:
    missing = [path for path, lo, hi in bounded_integers() if lo is None or hi is None]
    assert missing == []


@pytest.mark.parametrize(("path", "lo", "hi"), bounded_integers(), ids=lambda v: str(v))
def test_the_operator_accepts_what_the_crd_admits_and_refuses_one_past(
    path: str, lo: int, hi: int
) -> None:
    """The CRD is generated from the models the operator validates with: at both bounds a
    spec is accepted, one past either is refused naming the field."""
    for value in (lo, hi):
        parse_spec(with_value(path, value), namespace="ns", name="n")
    for value in (lo - 1, hi + 1):
        with pytest.raises(SpecError, match=re.escape(f"spec.{path}")):
            parse_spec(with_value(path, value), namespace="ns", name="n")


def test_every_crd_field_has_a_description() -> None:
    """`kubectl explain cqrsstack --recursive` shows a description for every field."""
    crd = yaml.safe_load(CRD.read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        if not node.get("description"):
            missing.append(path)
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")

    walk(root, "cqrsstack")
    # The API server forbids a schema for metadata; kubectl explains ObjectMeta itself.
    assert missing == ["cqrsstack.metadata"]


@pytest.mark.parametrize("value", [0, 50])
def test_replicas_at_the_bounds_are_accepted(value: int) -> None:
    spec = minimal() | {"writeApi": {"replicas": value}}
    assert parse_spec(spec, namespace="ns", name="n").write_api.replicas == value


def test_target_lag_one_past_the_bound_is_refused() -> None:
    spec = minimal() | {"projector": {"autoscaling": {"targetLag": 10**9 + 1}}}
    with pytest.raises(SpecError, match=r"targetLag"):
        parse_spec(spec, namespace="ns", name="n")


def test_adopt_is_off_unless_said() -> None:
    assert parse_spec(minimal(), namespace="ns", name="n").adopt is False
    assert parse_spec(minimal() | {"adopt": True}, namespace="ns", name="n").adopt is True


LONG_LABEL_HOST = "a" * 70 + ".example"  # IDNA refuses a label over 63 characters
UMLAUT_HOST = "ü" * 80


@pytest.mark.parametrize("host", [LONG_LABEL_HOST, UMLAUT_HOST, "a" * 64, "pg db", "-pg.db"])
def test_a_host_that_is_no_dns_name_nor_ip_is_refused(host: str) -> None:
    for mutate in (
        lambda s: s["databases"]["write"].update(host=host),
        lambda s: s.update(redis={"url": f"redis://{host}:6379/0"}),
    ):
        spec = minimal()
        mutate(spec)
        with pytest.raises(SpecError, match="DNS name"):
            parse_spec(spec, namespace="shop", name="orders")


@pytest.mark.parametrize("host", ["a" * 63 + ".example", "127.0.0.1", "::1", "pg.db.svc."])
def test_a_dns_name_at_the_label_limit_or_an_ip_is_accepted(host: str) -> None:
    spec = minimal()
    spec["databases"]["write"]["host"] = host
    assert parse_spec(spec, namespace="shop", name="orders").write_db.host == host


def test_the_crd_host_pattern_agrees_with_the_operator() -> None:
    pattern = re.compile(schema_at("databases.write.host")["pattern"])
    for host in ("a" * 63 + ".example", "127.0.0.1", "::1", "pg.db.svc."):
        assert pattern.match(host)
    for host in (LONG_LABEL_HOST, UMLAUT_HOST, "a" * 64, "pg db"):
        assert not pattern.match(host)


def test_names_shaped_like_another_stacks_defaults_are_reserved() -> None:
    theirs = default_names("tenant-a", "future")
    cases = [
        ({"databases": {"write": {"database": theirs.write_db}}}, "spec.databases.write"),
        ({"databases": {"read": {"database": theirs.read_db}}}, "spec.databases.read"),
        ({"stream": {"name": theirs.stream}}, "tenant-a"),
        ({"stream": {"name": f"{theirs.stream}:dead"}}, ":dead"),
        ({"stream": {"name": "orders:owner"}}, ":owner"),
    ]
    for change, why in cases:
        spec = minimal()
        for section, values in change.items():
            for key, value in values.items():
                target = spec.setdefault(section, {})
                target[key] = {**target.get(key, {}), **value} if isinstance(value, dict) else value
        stack = parse_spec(spec, namespace="tenant-b", name="atk")
        assert why in stack.reserved, change
    own = default_names("tenant-b", "atk")
    spec = minimal()
    spec["databases"]["write"]["database"] = own.write_db  # its own default: fine
    spec["stream"] = {"name": "tenant-b.other-events"}  # its own namespace: fine
    assert parse_spec(spec, namespace="tenant-b", name="atk").reserved == ""
    assert parse_spec(minimal(), namespace="tenant-b", name="atk").reserved == ""


@pytest.mark.parametrize(
    ("models", "accepted"),
    [
        (["records"], True),
        (["records", "history"], True),
        (["history"], True),
        ([], False),
        (["records", "records"], False),
        (["ledger"], False),
    ],
)
def test_read_models_are_named_once_from_the_known_ones(models: list, accepted: bool) -> None:
    spec = minimal() | {"readModels": [{"name": name} for name in models]}
    if accepted:
        assert parse_spec(spec, namespace="ns", name="n").read_models == tuple(models)
    else:
        with pytest.raises(SpecError, match=r"spec\.readModels"):
            parse_spec(spec, namespace="ns", name="n")


def test_read_models_default_to_records_at_version_1() -> None:
    stack = parse_spec(minimal(), namespace="ns", name="n")
    assert (stack.read_models, stack.model_versions) == (("records",), (("records", 1),))


@pytest.mark.parametrize(
    ("models", "accepted"),
    [
        ([{"name": "records", "version": 1}], True),
        ([{"name": "records", "version": 2**31 - 1}], True),
        ([{"name": "records", "version": 2**31}], False),
        ([{"name": "records", "version": 0}], False),
        # A name twice is refused whatever the versions (one version per model is live).
        ([{"name": "records", "version": 1}, {"name": "records", "version": 2}], False),
        (["records"], False),  # the list of names never shipped: no shim for it
    ],
)
def test_read_model_versions_are_bounded_one_per_name(models: list, accepted: bool) -> None:
    spec = minimal() | {"readModels": models}
    if accepted:
        stack = parse_spec(spec, namespace="ns", name="n")
        assert stack.model_versions == tuple((m["name"], m["version"]) for m in models)
    else:
        with pytest.raises(SpecError, match=r"spec\.readModels"):
            parse_spec(spec, namespace="ns", name="n")


def test_pool_sizes_are_set_by_the_spec_and_checked() -> None:
    spec = minimal()
    spec["databases"]["pool"] = {"minSize": 2, "maxSize": 2}
    stack = parse_spec(spec, namespace="ns", name="n")
    assert (stack.db_pool_min_size, stack.db_pool_max_size) == (2, 2)
    spec["databases"]["pool"] = {"minSize": 3, "maxSize": 2}
    with pytest.raises(SpecError, match=r"spec\.databases\.pool"):
        parse_spec(spec, namespace="ns", name="n")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("writeApi", "cqrs.dev/migration-job"),
        ("readApi", "app.kubernetes.io/component"),
        ("projector", "pod-template-hash"),
        ("migrationJob", "batch.kubernetes.io/job-name"),
        ("migrationJob", "job-name"),
        ("writeApi", "controller-uid"),
    ],
)
def test_pod_labels_in_the_operators_and_controllers_namespaces_are_refused(
    section: str, key: str
) -> None:
    spec = minimal() | {section: {"podLabels": {"team": "orders", key: "x"}}}
    with pytest.raises(SpecError, match=rf"spec\.{section}\.podLabels.*{re.escape(key)}"):
        parse_spec(spec, namespace="ns", name="n")
    # Near misses are the tenant's own: another domain, a longer plain key.
    fine = {"team": "orders", "example.com/cqrs.dev": "y", "job-name-x": "z", "my.cqrs.dev/a": "b"}
    parse_spec(minimal() | {section: {"podLabels": fine}}, namespace="ns", name="n")


def test_pod_labels_are_bounded_in_count() -> None:
    at_limit = {f"l{i}": "v" for i in range(MAX_POD_LABELS)}
    parse_spec(minimal() | {"writeApi": {"podLabels": at_limit}}, namespace="ns", name="n")
    past = at_limit | {"one-more": "v"}
    with pytest.raises(SpecError, match=r"spec\.writeApi\.podLabels"):
        parse_spec(minimal() | {"writeApi": {"podLabels": past}}, namespace="ns", name="n")


# ------------------------------------------------------------------ spec.tracing

COLLECTOR = "http://otel-collector.observability:4318"


def traced(**tracing: object) -> dict:
    return {**minimal(), "tracing": tracing}


def test_tracing_is_off_by_default_and_samples_every_trace_when_on() -> None:
    tracing = parse_spec(minimal(), namespace="ns", name="n").tracing
    assert (tracing.enabled, tracing.endpoint, tracing.sample_ratio) == (False, None, 1.0)
    on = parse_spec(traced(enabled=True, endpoint=COLLECTOR), namespace="ns", name="n").tracing
    assert (on.enabled, on.endpoint, on.sample_ratio) == (True, COLLECTOR, 1.0)


@pytest.mark.parametrize("ratio", [0, 0.5, 1])
def test_a_sample_ratio_from_0_to_1_is_accepted(ratio: float) -> None:
    spec = traced(enabled=True, endpoint=COLLECTOR, sampleRatio=ratio)
    assert parse_spec(spec, namespace="ns", name="n").tracing.sample_ratio == ratio


@pytest.mark.parametrize("ratio", [-0.001, 1.001, "all"])
def test_a_sample_ratio_past_0_to_1_is_refused(ratio: object) -> None:
    with pytest.raises(SpecError, match=r"spec\.tracing\.sampleRatio"):
        parse_spec(traced(sampleRatio=ratio), namespace="ns", name="n")


def test_tracing_enabled_needs_an_endpoint() -> None:
    with pytest.raises(SpecError, match=r"spec\.tracing: endpoint is required when tracing"):
        parse_spec(traced(enabled=True), namespace="ns", name="n")


ACCEPTED_ENDPOINTS = [
    COLLECTOR,
    "https://otlp.example.com",
    "http://[::1]:4318/otlp",
    "http://c",
    "http://c:4318/",
    "http://c:4318/otlp%20x/v1",  # a percent-escape
    "http://c:4318/a@b",  # an @ in the path is no login
    "http://10.0.0.1:4318/a_b~c.d-e",
]
# Each unlike the engines' \s (Python: any Unicode space; the API server's RE2: ASCII only),
# or what the kubelet expands in a pod's env ($(VAR)), or a login, query or fragment.
REFUSED_ENDPOINTS = [
    "otel-collector:4318",  # no scheme
    "grpc://otel-collector:4317",
    "http://user:secret@otel-collector:4318",  # a login: it would show in the pod spec
    "http://otel-collector:4318/?x=1",
    "http://otel-collector:4318#frag",
    "http://",
    "http://otel collector:4318",
    "http://c:4318/$(WRITE_DB_URL)",  # the kubelet would put the DB URL there
    "http://c:4318/$$(WRITE_DB_URL)",
    "http://$(HOST):4318",
    "http://c:4318\n",  # Python's $ matches before a trailing newline, RE2's does not
    "http://coll\x0bector:4318",  # \v: \s in Python, not in RE2
    "http://coll\u00a0ector:4318",
    "http://coll\u2028ector:4318",
    "http://coll\x85ector:4318",
    "http://c:4318/p\u00e9",  # non-ASCII
    "http://c:4318/%zz",  # % that is no percent-escape
    'http://c:4318/"x"',
    "http://[::1]x:4318",
    "http://c:port",
]


@pytest.mark.parametrize("endpoint", REFUSED_ENDPOINTS)
def test_an_endpoint_that_is_no_plain_http_url_is_refused_without_echoing_it(
    endpoint: str,
) -> None:
    with pytest.raises(SpecError, match=r"spec\.tracing\.endpoint: must be an http") as refused:
        parse_spec(traced(enabled=True, endpoint=endpoint), namespace="ns", name="n")
    assert "secret" not in str(refused.value)


def test_an_endpoint_at_the_length_limit_is_accepted_and_one_past_refused() -> None:
    limit = schema_at("tracing.endpoint")["maxLength"]
    stem = "http://c/"
    at_limit = stem + "p" * (limit - len(stem))
    parse_spec(traced(enabled=True, endpoint=at_limit), namespace="ns", name="n")
    with pytest.raises(SpecError, match=r"spec\.tracing\.endpoint"):
        parse_spec(traced(enabled=True, endpoint=at_limit + "p"), namespace="ns", name="n")


def test_the_crd_endpoint_pattern_agrees_with_the_operator() -> None:
    """The generated CRD carries the model's one pattern, and it reads the same in an engine
    without Python's Unicode classes: only explicit ASCII classes, no \\s, \\w, \\d or dot
    (tests/operator/test_operator_tracing.py asks the API server's RE2 itself)."""
    written = schema_at("tracing.endpoint")["pattern"]
    assert written == OTLP_ENDPOINT_PATTERN
    assert not re.search(r"\\[sSwWdDbB]|(?<!\\)\.(?![^\[]*\])", written), written
    assert written.isascii()
    pattern = re.compile(written)
    assert all(pattern.fullmatch(e) for e in ACCEPTED_ENDPOINTS)
    assert not any(pattern.fullmatch(e) for e in REFUSED_ENDPOINTS)
    for endpoint in ACCEPTED_ENDPOINTS:
        parse_spec(traced(enabled=True, endpoint=endpoint), namespace="ns", name="n")

"""Parsing a CqrsStack spec: defaults, derived names, and errors that name the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cqrs_operator.spec import IDENTIFIER, SpecError, parse_spec, sql_identifier


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
    assert stack.image == "cqrs-stack:0.1.0"
    assert stack.stream_name == "orders-events"
    assert stack.consumer_group == "projectors"
    assert stack.write_db.name == "shop_orders_write"
    assert stack.read_db.name == "shop_orders_read"
    assert stack.write_db.port == 5432
    assert stack.role == "cqrs_shop_orders"
    assert stack.projector.batch_size == 500
    assert stack.deletion_policy == "Retain"
    assert not stack.projector.autoscaling.enabled


def test_dashes_and_leading_digits_become_valid_identifiers() -> None:
    stack = parse_spec(minimal(), namespace="1-team", name="my-app")
    assert stack.write_db.name == "_1_team_my_app_write"
    assert IDENTIFIER.match(stack.role)


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
            "spec.projector.autoscaling.minReplicas",
        ),
    ],
)
def test_invalid_specs_name_the_field(mutate, field: str) -> None:
    spec = minimal()
    mutate(spec)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(spec, namespace="ns", name="n")


@given(st.text(min_size=1, max_size=300), st.sampled_from(["", "_write", "_read"]))
def test_sql_identifier_is_always_valid(text: str, suffix: str) -> None:
    name = sql_identifier(text, suffix)
    assert IDENTIFIER.match(name), name
    assert name.endswith(suffix)


def test_long_names_stay_unique() -> None:
    a = sql_identifier("x" * 80 + "a", "_write")
    b = sql_identifier("x" * 80 + "b", "_write")
    assert a != b and len(a) <= 63 and len(b) <= 63


def test_an_over_long_stack_name_is_refused() -> None:
    with pytest.raises(SpecError, match=r"metadata\.name must be at most 50"):
        parse_spec({"redis": {"url": "redis://r:6379/0"}}, namespace="shop", name="n" * 51)

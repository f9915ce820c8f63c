"""The read models' registry, READ_MODELS and the watermark's rise: pure, in milliseconds."""

from __future__ import annotations

from importlib import resources

import pytest
from pydantic import ValidationError

from cqrs_stack.config import Settings
from cqrs_stack.projections import registered
from cqrs_stack.projections.ledger import rise_to


def test_every_model_is_registered_with_its_migrations() -> None:
    models = registered()
    assert list(models)[:2] == ["records", "history"]
    files = {
        p.name.removesuffix(".sql")
        for p in resources.files("cqrs_stack.migrations").joinpath("read").iterdir()
    }
    for model in models.values():
        assert set(model.migrations) <= files, model.name
        sql = "".join(
            resources.files("cqrs_stack.migrations").joinpath("read", f"{m}.sql").read_text()
            for m in model.migrations
        )
        for table in model.version_tables():
            assert f"CREATE TABLE {table} " in sql, (model.name, table)


@pytest.mark.parametrize(
    ("value", "names"),
    [("records", ("records",)), (" history , records,history", ("records", "history"))],
)
def test_read_models_are_parsed_records_first(value: str, names: tuple[str, ...]) -> None:
    assert Settings(read_models=value).read_model_names == names


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("records,nope", "unknown read model 'nope': known models are records, history"),
        ("history", "must include 'records'"),
        ("", "must include 'records'"),
    ],
)
def test_bad_read_models_are_refused_naming_the_known_ones(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(read_models=value)


def test_the_watermark_rises_to_just_below_the_first_command_not_applied() -> None:
    assert rise_to(10, 20, [11, 12, 15], {11, 12, 15}) == 20  # gaps (13, 14) never existed
    assert rise_to(10, 20, [11, 12, 15], {11, 15}) == 11
    assert rise_to(10, 20, [11], set()) == 10  # cannot rise
    assert rise_to(10, 20, [], set()) == 20

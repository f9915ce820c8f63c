"""The generated files are what the spec models give, and nothing else states a default.

``make generate`` (``python -m cqrs_operator.schema write``) writes the CRD, the `stack` part
of values.schema.json and docs/cqrsstack-spec.md from cqrs_stack.stack_spec.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from cqrs_operator import schema
from cqrs_stack import stack_spec
from cqrs_stack.config import Settings

VALUES = schema.ROOT / "charts" / "cqrs-stack" / "values.yaml"


@pytest.mark.parametrize("path", sorted(schema.generated_files()), ids=lambda p: p.name)
def test_committed_generated_files_are_up_to_date(path) -> None:
    """Fails when a model changed without `make generate`, or a generated file was edited."""
    expected = schema.generated_files()[path]
    assert path.read_text() == expected, f"{path.name} is stale: run `make generate`"


def test_check_command_reports_a_stale_file(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("edited by hand\n")
    monkeypatch.setattr(
        schema, "generated_files", lambda: {schema.ROOT / "crd.yaml": "generated\n"}
    )
    monkeypatch.setattr(schema, "ROOT", tmp_path)
    assert schema.main(["check"]) == 1


def model_defaults(model: type[BaseModel], values: dict[str, Any], path: str) -> list[str]:
    """Paths where values.yaml states a default other than the model's."""
    wrong: list[str] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in values:
            continue
        value = values[key]
        annotation = info.annotation
        nested = next(
            (
                t
                for t in getattr(annotation, "__args__", (annotation,))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if nested is not None and isinstance(value, dict):
            wrong += model_defaults(nested, value, f"{path}.{key}")
        elif not info.is_required() and value not in ({}, [], ""):
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list):  # a list of models (readModels) as values.yaml has it
                default = [
                    d.model_dump(by_alias=True) if isinstance(d, BaseModel) else d for d in default
                ]
            if value != default:
                wrong.append(f"{path}.{key}: values.yaml {value!r}, model {default!r}")
    return wrong


def test_values_yaml_states_the_models_defaults() -> None:
    """values.yaml repeats defaults for readability: each must be the model's."""
    stack = yaml.safe_load(VALUES.read_text())["stack"]
    assert model_defaults(stack_spec.CqrsStackSpec, stack, "stack") == []


def test_values_yaml_has_only_spec_keys_and_the_charts_own() -> None:
    stack = yaml.safe_load(VALUES.read_text())["stack"]
    fields = {f.alias for f in stack_spec.CqrsStackSpec.model_fields.values()}
    assert set(stack) - fields == {"enabled", "name"}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("projector_batch_size", 100_001),
        ("projector_max_deliveries", 1001),
        ("stream_max_length", 10**12 + 1),
        ("db_pool_max_size", 1001),
        ("projector_poll_interval", 0),
    ],
)
def test_the_services_take_the_specs_bounds(setting: str, value: Any) -> None:
    """One past the spec's bound is refused by Settings too (the same type, not a copy)."""
    with pytest.raises(ValidationError):
        Settings(**{setting: value})


def test_every_description_reaches_the_crd_and_the_reference() -> None:
    reference = schema.reference()
    for model in (stack_spec.Projector, stack_spec.ProjectorAutoscaling, stack_spec.PodControls):
        for info in model.model_fields.values():
            assert info.description and info.description in reference.replace("\\|", "|")

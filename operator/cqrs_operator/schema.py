"""What is generated from the spec models (cqrs_stack.stack_spec), and the command that writes it.

- :func:`crd` — the CqrsStack CustomResourceDefinition: an OpenAPI v3 structural schema with
  a description on every field, the models' bounds, enums, defaults and CEL rules;
- :func:`values_stack_schema` — the ``stack`` part of the chart's ``values.schema.json``
  (JSON Schema draft-07, closed objects; values the chart fills in may be left empty);
- :func:`reference` — the configuration reference (Markdown).

``python -m cqrs_operator.schema write`` (``make generate``) writes the three files;
``python -m cqrs_operator.schema check`` fails when a committed one differs.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cqrs_stack.stack_spec import ROOT_RULES, CqrsStackSpec, CqrsStackStatus

GROUP = "cqrs.dev"
VERSION = "v1alpha1"
PLURAL = "cqrsstacks"
KIND = "CqrsStack"

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts" / "cqrs-stack" / "crds" / "cqrsstacks.cqrs.dev.yaml"
VALUES_SCHEMA_PATH = ROOT / "charts" / "cqrs-stack" / "values.schema.json"
REFERENCE_PATH = ROOT / "docs" / "cqrsstack-spec.md"
GENERATED = "generated from services/cqrs_stack/stack_spec.py by `make generate`; do not edit"

PRINTER_COLUMNS: list[dict[str, str]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "description": "why the stack is (not) Ready",
    },
    {
        "name": "Write",
        "type": "integer",
        "jsonPath": ".spec.writeApi.replicas",
        "description": "write-api replicas",
    },
    {
        "name": "Read",
        "type": "integer",
        "jsonPath": ".spec.readApi.replicas",
        "description": "read-api replicas",
    },
    {
        "name": "Projector",
        "type": "integer",
        "jsonPath": ".status.projector.replicas",
        "description": "projector replicas",
    },
    {
        "name": "Lag",
        "type": "integer",
        "jsonPath": ".status.projector.lag",
        "description": "events not yet projected",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# Values of the chart's `stack` that may stay empty: the chart fills them in (appVersion,
# the dev databases), paths as in the spec.
CHART_FILLED = (
    "image.tag",
    "databases.write.host",
    "databases.write.adminSecret",
    "databases.write.database",
    "databases.read.host",
    "databases.read.adminSecret",
    "databases.read.database",
    "redis.url",
    "redis.urlSecret.name",
    "redis.urlSecret.key",
)
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
KEY_ORDER = ("type", "description", "default", "required", "enum")

Schema = dict[str, Any]


# ------------------------------------------------------------------ pydantic -> OpenAPI


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline $ref and single-branch allOf; a field's own keys win over its model's."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**_resolve(target, defs), **rest}
    if "allOf" in node and len(node["allOf"]) == 1:
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return {**_resolve(node["allOf"][0], defs), **rest}
    return node


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """One pydantic JSON Schema node as an OpenAPI v3 structural node (recursively)."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) < len(node["anyOf"]):  # Optional[X]: absent, never null
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if rest.get("default", 0) is None:
                del rest["default"]
            base = branches[0] if len(branches) == 1 else {"anyOf": branches}
            return _structural({**_resolve(base, defs), **rest}, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "properties":
            out[key] = {name: _structural(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _structural(value, defs)
        elif key == "anyOf":
            out[key] = [_structural(b, defs) for b in value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "maxItems" and node.get("type") != "array":
            continue
        else:
            out[key] = value
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    return _ordered(out)


def _ordered(node: Schema) -> Schema:
    head = {k: node[k] for k in KEY_ORDER if k in node}
    tail = {k: v for k, v in node.items() if k not in head and k != "properties"}
    props = {"properties": node["properties"]} if "properties" in node else {}
    return {**head, **tail, **props}


def model_schema(model: type[BaseModel]) -> Schema:
    """``model`` as an OpenAPI v3 structural schema (aliases, inlined, no titles, no nulls)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def open_api_schema() -> Schema:
    """The CRD's openAPIV3Schema: the spec and status models and the object-level rules."""
    return {
        "type": "object",
        "description": (
            "One CQRS key-value stack (write API, read API, projector) with its databases and "
            "stream."
        ),
        "required": ["spec"],
        "x-kubernetes-validations": ROOT_RULES,
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": f"APIVersion of this representation ({GROUP}/{VERSION})",
            },
            "kind": {"type": "string", "description": f"Kind of this object ({KIND})"},
            "metadata": {"type": "object"},
            "spec": model_schema(CqrsStackSpec),
            "status": model_schema(CqrsStackStatus),
        },
    }


def crd() -> dict[str, Any]:
    """The CqrsStack CustomResourceDefinition (the operator may apply it as it is)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "cqrs-stack",
                "app.kubernetes.io/part-of": "cqrs-stack",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["cqrs"],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


# ------------------------------------------------------------------ values.schema.json


def _walk(node: Schema, visit: Callable[[Schema, str], None], path: str = "") -> None:
    visit(node, path)
    for name, child in (node.get("properties") or {}).items():
        _walk(child, visit, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], visit, f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], visit, f"{path}{{}}")


def _as_values(node: Schema, path: str) -> None:
    """Turn one structural node into draft-07 for the chart's values (in place)."""
    for key in [k for k in node if k.startswith("x-kubernetes-")]:
        if key == "x-kubernetes-int-or-string":
            node["anyOf"] = [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": QUANTITY},
            ]
        if key == "x-kubernetes-list-type" and node[key] == "set":
            node["uniqueItems"] = True
        if key == "x-kubernetes-preserve-unknown-fields":
            node.setdefault("type", "object")
        del node[key]
    if node.pop("exclusiveMinimum", None) is True:
        node["exclusiveMinimum"] = node.pop("minimum")
    node.pop("required", None)  # the chart fills in what a stack needs (templates' `required`)
    if "properties" in node:
        node["additionalProperties"] = False
    if path in CHART_FILLED:
        node.pop("minLength", None)
        if "pattern" in node:
            node["pattern"] = f"^$|{node['pattern']}"
        node["description"] += " (empty: filled in by the chart)"


def values_stack_schema() -> Schema:
    """The `stack` values: the spec's schema plus the chart's own keys, enabled and name."""
    spec = copy.deepcopy(model_schema(CqrsStackSpec))
    _walk(spec, _as_values)
    spec["description"] = f"the release's CqrsStack, as its spec ({GENERATED})"
    spec["properties"] = {
        "enabled": {"type": "boolean", "description": "create the release's CqrsStack"},
        "name": {
            "type": "string",
            "description": "stack name; empty: the release name",
            "maxLength": 50,
            "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        },
        **spec["properties"],
    }
    spec["required"] = ["enabled"]
    return spec


def values_schema(current: Schema) -> Schema:
    """``current`` (the chart's values.schema.json) with its `stack` part regenerated."""
    out = copy.deepcopy(current)
    out["properties"]["stack"] = values_stack_schema()
    return out


# ------------------------------------------------------------------ the reference


def _type_of(node: Schema) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" if v != "" else '`""`' for v in node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type_of(node.get('items') or {})}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_of(node['additionalProperties'])}"
    return str(kind)


def _bounds(node: Schema) -> str:
    parts = []
    if "minimum" in node:
        parts.append(("> " if node.get("exclusiveMinimum") else "≥ ") + str(node["minimum"]))
    if "maximum" in node:
        parts.append(f"≤ {node['maximum']}")
    if "minItems" in node:
        parts.append(f"{node['minItems']}..{node.get('maxItems', '')} items")
    elif "maxItems" in node:
        parts.append(f"≤ {node['maxItems']} items")
    if "maxLength" in node:
        parts.append(f"≤ {node['maxLength']} chars")
    if node.get("x-kubernetes-list-type") == "set":
        parts.append("no duplicates")
    return ", ".join(parts)


def _rows(node: Schema, path: str, required: bool) -> list[str]:
    """The reference rows of ``node`` (at ``path`` under spec) and of its fields."""
    default = node.get("default")
    shown = "" if default is None else f"`{json.dumps(default)}`"
    text = str(node.get("description", "")).replace("|", "\\|").replace("\n", " ")
    name = f"`spec.{path}`" + (" (required)" if required else "")
    rows = [f"| {name} | {_type_of(node)} | {shown} | {_bounds(node)} | {text} |"]
    children = node.get("properties") or {}
    if isinstance(node.get("items"), dict):
        children = node["items"].get("properties") or {}
        path += "[]"
    needed = set(node.get("required") or node.get("items", {}).get("required") or [])
    for key, child in children.items():
        rows += _rows(child, f"{path}.{key}", key in needed)
    return rows


def _rules(node: Schema, path: str) -> list[str]:
    """The CEL rules of ``node`` and below, one row each."""
    out = [f"| `{path}` | {r['message']} |" for r in node.get("x-kubernetes-validations") or []]
    children = dict(node.get("properties") or {})
    if isinstance(node.get("items"), dict):
        children = {"[]": node["items"]}
    for key, child in children.items():
        out += _rules(child, f"{path}{key}" if key == "[]" else f"{path}.{key}")
    return out


def reference() -> str:
    """The configuration reference: one row per spec field, then the CEL rules."""
    spec = model_schema(CqrsStackSpec)
    needed = set(spec.get("required") or [])
    rows = [
        row for key, child in spec["properties"].items() for row in _rows(child, key, key in needed)
    ]
    checks = [f"| `metadata`, `spec` | {r['message']} |" for r in ROOT_RULES] + _rules(spec, "spec")
    return "\n".join(
        [
            f"<!-- {GENERATED} -->",
            "# CqrsStack spec reference",
            "",
            f"`{KIND}` (`{GROUP}/{VERSION}`): every field of `spec` with its type, default and",
            "bounds, as the API server enforces them. The chart's `stack` values take the same",
            "keys (`charts/cqrs-stack/values.yaml`); the services' settings the same bounds",
            "(`services/cqrs_stack/config.py`).",
            "",
            "| field | type | default | bounds | description |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Rules the API server checks (CEL)",
            "",
            "| where | rule |",
            "|---|---|",
            *checks,
            "",
        ]
    )


# ------------------------------------------------------------------ files


def crd_yaml() -> str:
    import yaml  # a development dependency: the operator itself never writes YAML

    head = (
        f"# {GENERATED}.\n"
        "# The CqrsStack resource: one write API, read API and projector with their databases and\n"
        "# stream. The chart installs this file and the operator's tests apply it.\n"
    )

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every node written out, no &id001
            return True

    return head + yaml.dump(crd(), Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)


def values_schema_json() -> str:
    current = json.loads(VALUES_SCHEMA_PATH.read_text())
    return json.dumps(values_schema(current), indent=2, ensure_ascii=False) + "\n"


def generated_files() -> dict[Path, str]:
    """Every generated file and the text the models give it."""
    return {
        CRD_PATH: crd_yaml(),
        VALUES_SCHEMA_PATH: values_schema_json(),
        REFERENCE_PATH: reference(),
    }


def main(argv: list[str] | None = None) -> int:
    """``write`` the generated files, or ``check`` that the committed ones are up to date."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "check"
    stale = []
    for path, text in generated_files().items():
        if command == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(str(path.relative_to(ROOT)))
    if stale:
        print(f"out of date (run `make generate`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

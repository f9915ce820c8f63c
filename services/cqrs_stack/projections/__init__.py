"""The read models: the ``Projection`` interface (``base``) and one module per model.

Every module of this package is imported here, and each ``Projection`` subclass registers
itself by its ``name``: adding a model is one module here and one read-DB migration.
``READ_MODELS`` (Settings.read_models) chooses which ones a stack keeps.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from .base import Projection, apply_batch

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "ledger"):
        importlib.import_module(f"{__name__}.{_module.name}")

# The model the read API serves on GET /read/{key}: always enabled.
REQUIRED = "records"


def registered() -> dict[str, type[Projection]]:
    """Every known model, by name (records first)."""
    names = sorted(Projection.registry, key=lambda n: (n != REQUIRED, n))
    return {name: Projection.registry[name] for name in names}


def by_name(name: str) -> type[Projection]:
    """The model called ``name``; ValueError naming the known ones otherwise."""
    try:
        return Projection.registry[name]
    except KeyError:
        known = ", ".join(registered())
        raise ValueError(f"unknown read model {name!r}: known models are {known}") from None


def enabled(names: Sequence[str]) -> tuple[type[Projection], ...]:
    """The models named (records first, as progress is counted from it)."""
    chosen = [by_name(name) for name in names]
    return tuple(sorted(chosen, key=lambda p: p.name != REQUIRED))


__all__ = ["REQUIRED", "Projection", "apply_batch", "by_name", "enabled", "registered"]

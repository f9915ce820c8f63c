"""Schemathesis hooks for the fuzz run (loaded through SCHEMATHESIS_HOOKS).

A read may wait up to 60 s for ``?position=`` (by contract). The fuzzer would spend its whole
budget waiting, so an in-range ``timeout`` is shortened; out-of-range values are left as
generated, so negative cases stay negative.
"""

from __future__ import annotations

from typing import Any

import schemathesis

LONGEST_WAIT = 0.2


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    query = case.query
    if not isinstance(query, dict):
        return
    seconds = _seconds(query.get("timeout"))
    if seconds is not None and LONGEST_WAIT < seconds <= 60:
        query["timeout"] = LONGEST_WAIT
